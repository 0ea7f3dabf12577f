"""A/B runs of one proxy measurement: a few kinds alternated round by round, ratios per round.

Owns: the focused experiments behind docs/proxy.md#performance, which ``make bench`` is too
broad for (it runs every measurement for every kind). Uses bench/proxy.py's processes and
clients, so the proxies are configured exactly as there.

    python -m bench.ab iperf [--streams N] [--rounds R] [KIND,KIND,...]
    python -m bench.ab close [--rounds R] [KIND,KIND,...]

``iperf``: ``iperf3 -P N -t VIPD_BENCH_SECONDS`` through each kind (Gbit/s and the proxy's
CPU ms per GB); ``close``: ``wrk -c32 Connection: close`` against nginx (conn/s and CPU µs per
connection). KINDS default to ``haproxy-tuned,vipd``; ``vipd-base`` is the checkout named by
``VIPD_BENCH_BASE`` (compare two builds). The first kind is the reference for the ratios.
Prints each round as it ends, then the medians. Root, loopback only (127.77.0.0/16).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench import proxy as bp


def _measure(mode: str, host: str, port: int, proc, streams: int) -> tuple[float, float]:
    """(rate, CPU per unit): Gbit/s and ms per GB, or conn/s and µs per connection."""
    cpu0 = bp.cpu_seconds(proc)
    if mode == "iperf":
        gbit = bp.iperf3(host, port, streams)
        return gbit, bp.cpu_ms_per_gb(bp.cpu_seconds(proc) - cpu0, gbit)
    w = bp.wrk(host, port, 32, close=True)
    return w.rps, bp.cpu_us_per_request(bp.cpu_seconds(proc) - cpu0, w.requests)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["iperf", "close"])
    ap.add_argument("kinds", nargs="?", default="haproxy-tuned,vipd")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args(argv)
    kinds = args.kinds.split(",")
    unknown = [k for k in kinds if k not in bp.PROXIES]
    if unknown or ("vipd-base" in kinds and not bp.BASE):
        print(f"bench.ab: kinds: expected proxies from {sorted(bp.PROXIES)} "
              f"(vipd-base needs VIPD_BENCH_BASE), got {args.kinds!r}", file=sys.stderr)
        return 2
    unit = ("Gbit/s", "ms/GB") if args.mode == "iperf" else ("conn/s", "µs/conn")
    digits = 1 if args.mode == "iperf" else 0
    rate: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="vipd-ab-") as tmpd, ExitStack() as stack:
        tmp = Path(tmpd)
        if args.mode == "iperf":
            port = bp.IPERF_PORT
            stack.enter_context(bp.iperf3_server())
        else:
            port = bp.NGINX_PORT
            stack.enter_context(bp.nginx_server(tmp))
        at = {k: stack.enter_context(bp.running(k, tmp, port)) for k in kinds}
        for rnd in range(args.rounds):
            order = kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]
            for k in order:
                host, fport, proc = at[k]
                r, c = _measure(args.mode, host, fport, proc, args.streams)
                rate[k].append(r)
                cpu[k].append(c)
                time.sleep(0.3)
            print(f"round {rnd + 1}: " + "  ".join(f"{k} {rate[k][-1]:.{digits}f} {unit[0]}, {cpu[k][-1]:.0f} {unit[1]}"
                                                    for k in kinds), flush=True)
    ref = kinds[0]
    for k in kinds:
        line = f"{k}: median {statistics.median(rate[k]):.{digits + 1}f} {unit[0]}, {statistics.median(cpu[k]):.0f} {unit[1]}"
        if k != ref:
            paired = statistics.median(a / b for a, b in zip(rate[k], rate[ref], strict=True))
            line += f"; {k} / {ref} per round median {paired:.3f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
