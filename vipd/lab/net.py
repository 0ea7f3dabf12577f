"""The lab network: a bridge in a "switch" namespace and one namespace per member.

Owns: the address plan, creating and deleting the namespaces, veth pairs and bridge, and
the network faults the suite injects (cut a member's link at the switch; cut a node off
from etcd only, silently).

Topology (every name starts with the lab's prefix, e.g. ``vl3f2a``)::

    <p>-sw:  br0 ── <member>s ... (switch side of each veth)
    <p>-n1 / -n2 / -n3 / -etcd / -cl:  eth0 (10.251.72.x/24), lo

Must never: touch the root namespace (links are created inside the switch namespace with
their peer placed straight into the member namespace), or delete a namespace that does not
start with this lab's prefix.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from vipd.lab.nsutil import namespaces, run

SUBNET = ipaddress.ip_network("10.251.72.0/24")
VIP = "10.251.72.100"
ETCD_IP = "10.251.72.2"
CLIENT_IP = "10.251.72.50"
DEAD_GATEWAY = "10.251.72.254"  # never assigned: the etcd cut routes through it
NODES = ("n1", "n2", "n3")
NODE_IPS = {"n1": "10.251.72.11", "n2": "10.251.72.12", "n3": "10.251.72.13"}
IFACE = "eth0"


@dataclass
class LabNet:
    prefix: str
    nodes: tuple[str, ...] = NODES
    members: dict[str, str] = field(default_factory=dict)  # member → its IP

    def __post_init__(self) -> None:
        if not self.members:
            self.members = {**{n: NODE_IPS[n] for n in self.nodes}, "etcd": ETCD_IP, "cl": CLIENT_IP}

    def ns(self, member: str) -> str:
        return f"{self.prefix}-{member}"

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def all_namespaces(self) -> list[str]:
        return [self.switch] + [self.ns(m) for m in self.members]

    def _ip(self, ns: str, *args: str) -> None:
        run(["ip", "-n", ns, *args])

    def up(self) -> None:
        """Create everything; on failure remove what was made and re-raise."""
        try:
            for ns in self.all_namespaces():
                run(["ip", "netns", "add", ns])
                self._ip(ns, "link", "set", "lo", "up")
            sw = self.switch
            self._ip(sw, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
            self._ip(sw, "link", "set", "br0", "up")
            for member, ip in self.members.items():
                port = f"{member}s"
                self._ip(sw, "link", "add", port, "type", "veth", "peer", "name", IFACE, "netns", self.ns(member))
                self._ip(sw, "link", "set", port, "master", "br0", "up")
                self._ip(self.ns(member), "addr", "add", f"{ip}/{SUBNET.prefixlen}", "dev", IFACE)
                self._ip(self.ns(member), "link", "set", IFACE, "up")
            run(["ip", "netns", "exec", self.ns("cl"), "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"])
        except BaseException:
            self.down()
            raise

    def down(self) -> list[str]:
        """Delete this lab's namespaces (their veths go with them). Returns what was left over."""
        for ns in self.all_namespaces():
            if ns in namespaces():
                run(["ip", "netns", "del", ns], check=False)
        return [ns for ns in namespaces() if ns.startswith(self.prefix + "-")]

    # --- faults ------------------------------------------------------------------------------

    def cut_link(self, member: str) -> None:
        """Take the member's port on the switch down (its eth0 loses carrier)."""
        self._ip(self.switch, "link", "set", f"{member}s", "down")

    def restore_link(self, member: str) -> None:
        self._ip(self.switch, "link", "set", f"{member}s", "up")

    def cut_from_etcd(self, node: str) -> None:
        """Silently lose the node's packets to etcd; clients still reach it.

        This kernel has no tc qdiscs to drop with, and a blackhole route fails fast (EINVAL),
        which is kinder than a real partition. So the etcd address is routed via a neighbour
        that does not exist: established connections hang, new ones time out.
        """
        self._ip(self.ns(node), "route", "add", f"{ETCD_IP}/32", "via", DEAD_GATEWAY, "dev", IFACE)

    def restore_etcd(self, node: str) -> None:
        self._ip(self.ns(node), "route", "del", f"{ETCD_IP}/32", "via", DEAD_GATEWAY, "dev", IFACE)
