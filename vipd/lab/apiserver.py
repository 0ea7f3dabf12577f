"""The kube-apiserver STAND-IN: a small HTTPS server that answers ``/readyz`` naming its node.

It is not an apiserver; it only lets the lab check that a client reached *a healthy backend
through the VIP*, and which one. It runs as its own process in a node namespace
(``python -m vipd.lab.apiserver --node n1 --cert C --key K --listen 0.0.0.0:6444``) so the
suite can kill it like a real apiserver. ``/readyz`` and ``/healthz`` answer 200 with
``ok <node> (apiserver stand-in)``; anything else is 404.

Also owns: the lab's throw-away TLS material (a trustme CA and one server certificate for
the lab's addresses), written into the lab directory.

Must never: listen outside the namespace it is started in, or be mistaken for a real
apiserver (every answer says "stand-in").
"""

from __future__ import annotations

import argparse
import http.server
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

PORT = 6444


def write_tls(directory: Path, addresses: Sequence[str]) -> tuple[Path, Path, Path]:
    """CA cert, server cert chain and key for ``addresses``; returns (ca, cert, key) paths."""
    try:
        import trustme
    except ImportError as exc:
        from vipd.lab.nsutil import LabError

        raise LabError("vipd lab needs trustme: pip install 'vipd[lab]' (make demo does)") from exc

    ca = trustme.CA(organization_name="vipd lab (throw-away)")
    cert = ca.issue_cert(*addresses, "localhost")
    paths = directory / "ca.pem", directory / "apiserver.pem", directory / "apiserver-key.pem"
    ca.cert_pem.write_to_path(str(paths[0]))
    cert.private_key_and_cert_chain_pem.write_to_path(str(paths[1]))
    cert.private_key_pem.write_to_path(str(paths[2]))
    return paths


def make_handler(node: str) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "vipd-lab-apiserver-stand-in"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?")[0] in ("/readyz", "/healthz", "/livez"):
                body, code = f"ok {node} (apiserver stand-in)\n".encode(), 200
            else:
                body, code = b"not found (apiserver stand-in)\n", 404
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # quiet: probes are many
            pass

    return Handler


def serve(node: str, listen: str, cert: str, key: str) -> None:
    host, _, port = listen.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer((host, int(port)), make_handler(node))
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    print(f"apiserver stand-in for {node} on https://{listen}", flush=True)
    server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="HTTPS kube-apiserver stand-in for the vipd lab")
    p.add_argument("--node", required=True)
    p.add_argument("--listen", default=f"0.0.0.0:{PORT}")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    args = p.parse_args(argv)
    try:
        serve(args.node, args.listen, args.cert, args.key)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
