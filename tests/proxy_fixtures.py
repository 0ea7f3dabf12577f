"""Fixtures for the load balancer tests: configs, loopback addresses, and real peer processes.

Run as a script this file is the peer: ``python tests/proxy_fixtures.py MODE ...`` with
  blast-serve HOST PORT NBYTES   accept the first connection that sends, send NBYTES then FIN while reading to EOF
  blast-client HOST PORT NBYTES  connect, the same from the client side
  echo HOST PORT                 echo server (trio), prints "ready"
  churn HOST PORT N PARALLEL     N short connections (send, read the echo, close)
  https HOST PORT CERT KEY       HTTPS server: /readyz → 200 "ok", / → 200 "hello from backend"
The blast modes print one JSON line: bytes and crc32 of what was sent and what was received.
Peers run as separate processes so the proxy under test has the test process to itself.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
import threading
import zlib
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve()
PY = sys.executable

_block_cache: dict[int, bytes] = {}


def _block() -> bytes:
    # An odd-sized block so that lost, repeated or reordered chunks change the checksum.
    if 0 not in _block_cache:
        _block_cache[0] = os.urandom((1 << 20) + 7)
    return _block_cache[0]


# ---------------------------------------------------------------------------------------------
# In-test helpers
# ---------------------------------------------------------------------------------------------

_octet = itertools.count(1)


def loopback_address() -> str:
    """A fresh 127.x.y.z per call (per process) so tests never fight over ports."""
    n = next(_octet)
    return f"127.{100 + os.getpid() % 100}.{(n // 250) % 250 + 1}.{n % 250 + 1}"


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def proxy_config(backends: list[tuple[str, int]], *, host: str | None = None, port: int | None = None,
                 extra: dict[str, Any] | None = None, **proxy: Any):
    """A Config whose proxy listens on host:port (fresh loopback defaults) with static backends.
    Keyword arguments are proxy field keys without the ``proxy.`` prefix, ``.`` as ``__``."""
    from vipd import config

    host = host or loopback_address()
    port = port or free_port(host)
    flags: dict[str, Any] = {
        "election.backend": "none",
        "proxy.bind_to_vip": False,
        "proxy.bind_address": host,
        "proxy.port": port,
        "proxy.backends": [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in backends],
        "proxy.health.check": "tcp",
        "proxy.health.interval": "1s",
        "shutdown_timeout": "30s",
    }
    for key, value in proxy.items():
        flags["proxy." + key.replace("__", ".")] = value
    flags.update(extra or {})
    return config.load(flags=flags, environ={}, require_vip=False)


async def always_healthy(host: str, port: int) -> tuple[bool, str]:
    """A fake health check (never connects) for tests whose backends must see only clients."""
    await trio.lowlevel.checkpoint()
    return True, "fake check"


async def wait_until(predicate: Any, limit: float = 10.0) -> None:
    """Poll a condition that has no event of its own (counters), bounded by ``limit`` seconds."""
    with trio.fail_after(limit):
        for _ in itertools.count():
            if predicate():
                return
            await trio.sleep(0.01)


def tcp_listening(host: str, port: int) -> bool:
    """Whether an IPv4 socket listens on host:port, read from /proc/net/tcp: no connection is
    made (a probe connection would be a client to servers such as ``iperf3 -s -1``)."""
    want = f"{int.from_bytes(socket.inet_aton(host), 'little'):08X}:{port:04X}"
    with open("/proc/net/tcp") as fh:
        next(fh)
        return any(f[1] == want and f[3] == "0A" for f in (line.split() for line in fh))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def lowest_free_fd() -> int:
    """The number the next new fd would get: every fd below it is open."""
    fd = os.dup(0)
    os.close(fd)
    return fd


@asynccontextmanager
async def running_proxy(cfg, state=None, check=None):
    """Run vipd's proxy in this process; yields (proxy, state). Cancelled on exit."""
    from vipd.proxy.server import run_proxy
    from vipd.state import RuntimeState

    state = state or RuntimeState(node="test")
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def run(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await run_proxy(cfg, state, task_status=task_status, check=check)

        proxy = await nursery.start(run)
        try:
            yield proxy, state
        finally:
            scope.cancel()


async def start_peer(nursery: trio.Nursery, *args: Any) -> trio.Process:
    """A long-running peer (echo/https) that prints "ready" once listening."""
    proc = await trio.lowlevel.open_process([PY, str(HERE), *map(str, args)], stdout=-1)
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(10):
        while b"ready" not in buf:
            chunk = await proc.stdout.receive_some(100)
            if not chunk:
                raise RuntimeError(f"peer {args} exited before ready")
            buf += chunk
    return proc


def stop_peer(proc: trio.Process) -> None:
    if proc.returncode is None:
        proc.kill()


async def run_peer(*args: Any) -> dict[str, Any]:
    """Run a one-shot peer (blast-*, churn) to completion; returns its JSON line."""
    res = await trio.run_process([PY, str(HERE), *map(str, args)], capture_stdout=True, capture_stderr=True,
                                 check=False)
    if res.returncode != 0:
        raise AssertionError(f"peer {args} failed: {res.stderr.decode()[-2000:]}")
    return json.loads(res.stdout.decode().strip().splitlines()[-1])


async def echo_handler(stream: trio.SocketStream, tag: bytes = b"") -> None:
    """Echo with an optional tag prefix on each reply (which backend answered)."""
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(tag + data)
    except trio.BrokenResourceError:
        pass


async def roundtrip(stream: trio.SocketStream, msg: bytes) -> bytes:
    await stream.send_all(msg)
    return await stream.receive_some(65536)


async def tcp_listener(host: str, port: int = 0, backlog: int = 128) -> trio.SocketListener:
    sock = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind((host, port))
    sock.listen(backlog)
    return trio.SocketListener(sock)


def listener_port(listener: trio.SocketListener) -> int:
    return listener.socket.getsockname()[1]


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some(65536):
        out += chunk
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Peer process modes
# ---------------------------------------------------------------------------------------------


def _blast(sock: socket.socket, nbytes: int) -> dict[str, Any]:
    result: dict[str, Any] = {}

    def send() -> None:
        crc, left = 0, nbytes
        block = memoryview(_block())
        while left:
            chunk = block[: min(left, len(block))]
            sock.sendall(chunk)
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
        sock.shutdown(socket.SHUT_WR)
        result["sent"], result["sent_crc"] = nbytes, crc

    t = threading.Thread(target=send)
    t.start()
    crc, got = 0, 0
    buf = bytearray(1 << 20)
    while n := sock.recv_into(buf):
        crc = zlib.crc32(memoryview(buf)[:n], crc)
        got += n
    t.join()
    result["received"], result["received_crc"] = got, crc
    return result


def _peer_main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "blast-serve":
        host, port, nbytes = argv[1], int(argv[2]), int(argv[3])
        ls = socket.create_server((host, port))
        print("ready", flush=True)
        while True:  # health checks connect and close: serve the first connection that talks
            conn, _ = ls.accept()
            if conn.recv(1, socket.MSG_PEEK):
                break
            conn.close()
        print(json.dumps(_blast(conn, nbytes)), flush=True)
    elif mode == "blast-client":
        host, port, nbytes = argv[1], int(argv[2]), int(argv[3])
        conn = socket.create_connection((host, port))
        print(json.dumps(_blast(conn, nbytes)), flush=True)
    elif mode == "echo":
        trio.run(_echo_server, argv[1], int(argv[2]))
    elif mode == "churn":
        print(json.dumps(trio.run(_churn, argv[1], int(argv[2]), int(argv[3]), int(argv[4]))), flush=True)
    elif mode == "https":
        _https_server(argv[1], int(argv[2]), argv[3], argv[4])
    else:
        raise SystemExit(f"unknown mode {mode}")


async def _echo_server(host: str, port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)

    async def echo(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    print("ready", flush=True)
    await trio.serve_listeners(echo, listeners)


async def _churn(host: str, port: int, n: int, parallel: int) -> dict[str, int]:
    counts = {"ok": 0, "failed": 0}
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            try:
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    msg = b"ping %d\n" % i
                    await stream.send_all(msg)
                    got = b""
                    while len(got) < len(msg):
                        chunk = await stream.receive_some(100)
                        if not chunk:
                            break
                        got += chunk
                counts["ok" if got == msg else "failed"] += 1
            except (OSError, trio.BrokenResourceError):
                counts["failed"] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(parallel):
            nursery.start_soon(worker)
    return counts


def _https_server(host: str, port: int, cert: str, key: str) -> None:
    import ssl
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            body = b"ok" if self.path == "/readyz" else b"hello from backend\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer((host, port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    print("ready", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    _peer_main(sys.argv[1:])
