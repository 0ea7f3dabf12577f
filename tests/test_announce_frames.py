"""Golden bytes for every announcement frame, cross-checked by hand assembly and by parsing
the bytes back with scapy."""

from __future__ import annotations

import ipaddress
import socket
import struct

from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from vipd.announce import ARP_REPLY, ARP_REQUEST, frames_for, garp, unsolicited_na
from vipd.config import Vip

MAC = "02:00:00:00:00:0a"
MAC_B = bytes.fromhex("02000000000a")

# Ethernet dst broadcast | src | 0806 | htype 1 ptype 0800 hlen 6 plen 4 | op | sha | spa | tha | tpa | pad
GARP_REQUEST = bytes.fromhex(
    "ffffffffffff" "02000000000a" "0806"
    "0001" "0800" "06" "04" "0001"
    "02000000000a" "0a000032" "000000000000" "0a000032"
    + "00" * 18
)
GARP_REPLY = bytes.fromhex(
    "ffffffffffff" "02000000000a" "0806"
    "0001" "0800" "06" "04" "0002"
    "02000000000a" "0a000032" "ffffffffffff" "0a000032"
    + "00" * 18
)
# Ethernet 33:33:00:00:00:01 | src | 86dd | IPv6 v6, payload 32, next hdr 58, hop limit 255,
# src fd00::50, dst ff02::1 | ICMPv6 type 136 code 0 checksum 59f4 flags O (0x20) | target
# fd00::50 | option type 2 (target link-layer address) len 1 | MAC
UNSOLICITED_NA = bytes.fromhex(
    "333300000001" "02000000000a" "86dd"
    "60000000" "0020" "3a" "ff"
    "fd000000000000000000000000000050" "ff020000000000000000000000000001"
    "88" "00" "59f4" "20000000"
    "fd000000000000000000000000000050"
    "02" "01" "02000000000a"
)


def _icmpv6_checksum(src: str, dst: str, payload: bytes) -> int:
    pseudo = (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
              + struct.pack("!I3xB", len(payload), 58))
    data = pseudo + payload
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_garp_request_golden():
    assert garp(MAC, "10.0.0.50", ARP_REQUEST) == GARP_REQUEST
    assert garp(MAC_B, "10.0.0.50", ARP_REQUEST) == GARP_REQUEST  # MAC as bytes (from the socket)


def test_garp_reply_golden():
    assert garp(MAC, "10.0.0.50", ARP_REPLY) == GARP_REPLY


def test_unsolicited_na_golden_and_checksum():
    frame = unsolicited_na(MAC, "fd00::50")
    assert frame == UNSOLICITED_NA
    icmp = bytearray(frame[54:])
    assert struct.unpack("!H", icmp[2:4])[0] == 0x59F4
    icmp[2:4] = b"\x00\x00"
    assert _icmpv6_checksum("fd00::50", "ff02::1", bytes(icmp)) == 0x59F4


def test_na_uncompressed_vip_is_normalised():
    assert unsolicited_na(MAC, "fd00:0:0:0:0:0:0:50") == UNSOLICITED_NA


def test_frames_parse_back_with_scapy():
    for op in (ARP_REQUEST, ARP_REPLY):
        pkt = Ether(garp(MAC, "192.0.2.7", op))
        assert pkt.dst == "ff:ff:ff:ff:ff:ff" and pkt.src == MAC
        arp = pkt[ARP]
        assert (arp.op, arp.hwsrc, arp.psrc, arp.pdst) == (op, MAC, "192.0.2.7", "192.0.2.7")
    pkt = Ether(unsolicited_na(MAC, "2001:db8::7"))
    ip6, na = pkt[IPv6], pkt[ICMPv6ND_NA]
    assert (pkt.dst, ip6.src, ip6.dst, ip6.hlim) == ("33:33:00:00:00:01", "2001:db8::7", "ff02::1", 255)
    assert (na.R, na.S, na.O, na.tgt) == (0, 0, 1, "2001:db8::7")
    assert pkt[ICMPv6NDOptDstLLAddr].lladdr == MAC
    # scapy recomputes the checksum when we drop it: must match what we built
    original = na.cksum
    del na.cksum
    assert Ether(bytes(pkt))[ICMPv6ND_NA].cksum == original


def test_frames_for_round():
    vips = [Vip(ipaddress.ip_interface("10.0.0.50/32")), Vip(ipaddress.ip_interface("fd00::50/128"))]
    frames = frames_for(vips, MAC)
    assert [(f.kind, f.address) for f in frames] == [
        ("garp-request", "10.0.0.50"), ("garp-reply", "10.0.0.50"), ("unsolicited-na", "fd00::50")]
    assert [f.data for f in frames] == [GARP_REQUEST, GARP_REPLY, UNSOLICITED_NA]
    assert vips[1].family == socket.AF_INET6
