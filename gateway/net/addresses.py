"""Which hosts a caller's reference URL may name: public addresses only.

Pure policy, no I/O. A caller's URL is fetched by the gateway or handed to a
hosted provider, so an address that leads into a private network (loopback,
RFC 1918, link-local and cloud metadata, carrier-grade NAT, multicast,
reserved) is refused however it is spelt:

- IPv4 written the way `inet_aton` and URL parsers still read it: one
  decimal number (`2852039166`), hex (`0x7f000001`), octal (`0177.0.0.1`),
  short forms (`127.1`). These are refused outright, public or not: two
  parsers seldom agree on them, and a dotted quad says the same thing plainly.
- IPv4 inside IPv6: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
  (`::a.b.c.d`), NAT64 (`64:ff9b::/96`; the local-use `64:ff9b:1::/48` is
  refused whole), 6to4 (`2002::/16`) and Teredo (`2001::/32`, server and
  client) are judged by the IPv4 address they carry.
- Names: `localhost` and `*.localhost` by name; a name ending in a dot
  (`127.0.0.1.`, `example.com.`), which resolvers read outside their search
  rules; any other name by every address it resolves to, and a name that does
  not resolve is refused too (`gateway.net.pinning` resolves it).

`is_global` alone is not enough: which IETF ranges it calls global changed
between Python releases (3.11 calls `192.0.0.8` global), so the special-use
ranges and the cloud metadata addresses are also refused by name here.

This is the one policy for every URL the gateway calls or fetches for a
caller (reference images, webhooks); an operator's `Allowlist` is the only
way past it.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from ipaddress import IPv4Address, IPv6Address

from gateway.net.allowlist import NOTHING_ALLOWED, Allowlist

IPAddress = IPv4Address | IPv6Address

# Cloud metadata services: AWS/GCP/Azure/OpenStack, Alibaba, AWS over IPv6.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "100.100.100.200", "fd00:ec2::254"))
# IANA special-purpose ranges (RFC 6890 and successors) that are never a public host.
SPECIAL_USE = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",
        "192.31.196.0/24",
        "192.52.193.0/24",
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",
        "192.175.48.0/24",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "100::/64",
        "2001:db8::/32",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
)

_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_LOCAL_NAMES = ("localhost", "localhost.localdomain")
# `localhost` may resolve to any loopback address: only allowlisting all of them lets it be resolved and judged.
_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_NUMERIC_LABEL = re.compile(r"^(?:0[xX][0-9a-fA-F]*|[0-9]+)$")


class HostRefused(ValueError):
    """A reference URL's host is not a public address, or not a well-formed one."""


def embedded_ipv4(addr: IPv6Address) -> list[IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo)."""
    found: list[IPv4Address] = []
    low32 = IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.ipv4_mapped is not None:
        found.append(addr.ipv4_mapped)
    if addr in _IPV4_COMPATIBLE or addr in _NAT64:
        found.append(low32)
    if addr.sixtofour is not None:
        found.append(addr.sixtofour)
    if addr.teredo is not None:
        found.extend(addr.teredo)
    return found


def is_public(addr: IPAddress) -> bool:
    """True for an address on the public internet; an IPv6 address that carries
    IPv4 is as public as the IPv4 address it carries."""
    if isinstance(addr, IPv6Address):
        if addr.scope_id or addr in _NAT64_LOCAL:
            return False
        carried = embedded_ipv4(addr)
        if carried:
            return all(is_public(v4) for v4 in carried) and (addr.teredo is None or addr.is_global)
    if addr in METADATA_ADDRESSES or any(addr in net for net in SPECIAL_USE if net.version == addr.version):
        return False
    return addr.is_global and not (addr.is_multicast or addr.is_reserved or addr.is_unspecified)


def _ipv4_number(label: str) -> int | None:
    if label[:2].lower() == "0x":
        digits, base = label[2:], 16
    elif len(label) > 1 and label.startswith("0"):
        digits, base = label[1:], 8
    else:
        digits, base = label, 10
    if not digits:
        return 0
    try:
        return int(digits, base)
    except ValueError:
        return None


def loose_ipv4(host: str) -> IPv4Address | None:
    """The IPv4 address a host spells in any form URL parsers accept (`127.1`,
    `0x7f000001`, `2852039166`, `0177.0.0.1`), or None for a name.

    Raises HostRefused for a host that ends in a number yet is no address
    (`1.2.3.4.5`, `256.1.1.1`, `09.1.1.1`): no resolver should be asked."""
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()
    if not labels or not _NUMERIC_LABEL.match(labels[-1]):
        return None
    numbers = [_ipv4_number(label) for label in labels] if len(labels) <= 4 else [None]
    if any(n is None for n in numbers):
        raise HostRefused(f"{host!r} is neither a host name nor an IPv4 address")
    values = [n for n in numbers if n is not None]
    if any(n > 255 for n in values[:-1]) or values[-1] >= 256 ** (5 - len(values)):
        raise HostRefused(f"{host!r} is out of range for an IPv4 address")
    value = values[-1]
    for i, n in enumerate(values[:-1]):
        value += n << (8 * (3 - i))
    return IPv4Address(value)


def literal_address(host: str) -> IPAddress | None:
    """The address a URL host names literally (IPv6 with or without brackets,
    dotted-quad IPv4), or None for a name to be resolved.

    Raises HostRefused for IPv4 in any other spelling and for malformed IPv6."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in bare:
        try:
            return IPv6Address(bare.replace("%25", "%"))
        except ValueError:
            raise HostRefused(f"{host!r} is not a valid IPv6 address") from None
    v4 = loose_ipv4(bare)
    if v4 is not None and bare.rstrip(".") != str(v4):
        raise HostRefused(f"{host!r} spells an IPv4 address in a non-standard form; write it as dotted decimal ({v4})")
    return v4


def refuse_unless_public_host(host: str, allow: Allowlist = NOTHING_ALLOWED) -> IPAddress | None:
    """Raise HostRefused for a host that is plainly not public (a literal
    non-public address, a non-standard IPv4 spelling, `localhost`, a name
    ending in a dot) unless `allow` lets it through; return the literal
    address, or None for a name still to be resolved and judged by
    `refuse_unless_all_public`."""
    if not host:
        raise HostRefused("the URL has no host")
    host = unicodedata.normalize("NFKC", host)  # fullwidth digits and dots read as ASCII ones to a resolver
    if host.endswith("."):
        raise HostRefused(f"{host!r} ends in a dot; write the host without it")
    if allow.permits_name(host):
        return None
    addr = literal_address(host)
    if addr is not None:
        if not (is_public(addr) or allow.permits_address(addr)):
            raise HostRefused(f"{addr} is not a public address")
        return addr
    name = host.lower()
    if (name in _LOCAL_NAMES or name.endswith(".localhost")) and not all(allow.permits_network(n) for n in _LOOPBACK):
        raise HostRefused(f"{name!r} is this machine")
    return None


def refuse_unless_all_public(host: str, addresses: list[IPAddress], allow: Allowlist = NOTHING_ALLOWED) -> None:
    """A name is public only if every address it resolves to is (or is
    allowlisted): the one a connection picks could be any of them."""
    if not addresses:
        raise HostRefused(f"{host!r} resolves to no address")
    if allow.permits_name(host):
        return
    private = [a for a in addresses if not (is_public(a) or allow.permits_address(a))]
    if private:
        raise HostRefused(f"{host!r} resolves to {private[0]}, which is not a public address")
