"""Hosts and networks an operator lets caller URLs reach although they are not public.

Only webhooks have one (`webhook_allow`, `KLEIN_WEBHOOK_ALLOW`): a receiver
inside the operator's own network. An entry is a name (matched exactly, any
case), an address or a CIDR; an address matches only in its standard
spelling (`127.0.0.1`, never `127.1`), and names ending in a dot are refused
before the allowlist is consulted (`gateway.net.addresses`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Allowlist:
    """Hosts and networks a caller URL may reach even when not https or not public."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowlist:
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            entry = entry.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def permits_name(self, host: str) -> bool:
        """True for a host allowlisted by name (not by address)."""
        return host.lower() in self.hosts

    def permits_host(self, host: str) -> bool:
        """True for a host allowlisted by name, or a literal address inside an allowlisted network."""
        if self.permits_name(host):
            return True
        try:
            address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            return False
        return self.permits_address(address)

    def permits_address(self, address: IPAddress) -> bool:
        return any(address in net for net in self.networks if net.version == address.version)

    def permits_network(self, network: IPNetwork) -> bool:
        """True when every address of `network` is allowlisted."""
        return any(network.subnet_of(net) for net in self.networks if net.version == network.version)  # type: ignore[arg-type]


NOTHING_ALLOWED = Allowlist()
