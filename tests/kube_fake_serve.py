"""Run tests/kube_fixtures.FakeApiServer as its own process (e.g. under `ip netns exec`), so a
real `vipd start` in a test namespace can reach it. Prints one JSON line {"kubeconfig": ...}
when serving; then answers stdin commands, one JSON line each:
    lease NAMESPACE NAME      → the Lease object, or null
Stops at EOF on stdin."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kube_fixtures import FakeApiServer  # noqa: E402


def main(directory: str) -> None:
    with FakeApiServer(Path(directory)) as fake:
        print(json.dumps({"kubeconfig": fake.kubeconfig, "url": fake.url}), flush=True)
        for line in sys.stdin:
            cmd, *args = line.split()
            if cmd == "lease":
                print(json.dumps(fake.lease(*args)), flush=True)
            else:
                print(json.dumps({"error": f"unknown command {cmd}"}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
