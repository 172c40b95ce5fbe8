"""Which IP addresses an image fetch may connect to: public ones only.

An IPv6 address can carry an IPv4 address that a gateway on the way forwards to: IPv4-mapped
(::ffff:0:0/96), 6to4 (2002::/16), Teredo (2001::/32, server and obfuscated client) and NAT64
(64:ff9b::/96). Such an address is public only when every IPv4 address inside it is too. The
local-use NAT64 prefix (64:ff9b:1::/48) places its IPv4 address where the operator chooses, so
it is never public.
"""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv6Address, IPv6Network

NAT64_WELL_KNOWN = IPv6Network("64:ff9b::/96")
NAT64_LOCAL_USE = IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(ip: IPv6Address) -> list[IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (empty for a plain IPv6 address)."""
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo is not None:
        found += list(ip.teredo)
    if ip in NAT64_WELL_KNOWN:
        found.append(IPv4Address(int(ip) & 0xFFFF_FFFF))
    return found


def _public(ip: IPv4Address | IPv6Address) -> bool:
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local
                                 or ip.is_reserved or ip.is_multicast or ip.is_unspecified
                                 or getattr(ip, "is_site_local", False))


def public_address(address: str, admit_loopback: bool = False) -> bool:
    """Whether a fetch may connect to `address`; `admit_loopback` (tests only) also admits
    127.0.0.0/8 and ::1, and nothing else that is not public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if admit_loopback and ip.is_loopback:
        return True
    if isinstance(ip, IPv6Address):
        if ip in NAT64_LOCAL_USE:
            return False
        inner = embedded_ipv4(ip)
        if ip.ipv4_mapped is not None:
            return public_address(str(ip.ipv4_mapped), admit_loopback)
        if inner and not all(_public(a) for a in inner):
            return False
    return _public(ip)
