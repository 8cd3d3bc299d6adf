"""What the fetch engine refuses to touch: other schemes, private addresses, fake images.

Image URLs come from thousands of publishers; a downloader that follows them blindly can be
pointed at a cloud metadata endpoint or an intranet, or fed an HTML page or a decompression
bomb. Every hop of every redirect is checked here, and again at connect time by the resolver.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

ALLOWED_SCHEMES = ("http", "https")
MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "image/png", "png"),
    (b"GIF87a", "image/gif", "gif"),
    (b"GIF89a", "image/gif", "gif"),
    (b"II*\x00", "image/tiff", "tif"),
    (b"MM\x00*", "image/tiff", "tif"),
)


class BlockedAddress(OSError):
    """A host that resolves only to loopback, private, link-local or multicast addresses."""


# not public, though Python's `ipaddress` calls them neither private nor reserved (3.11): carrier-grade
# NAT space (cloud metadata endpoints live there, e.g. 100.100.100.200) and IETF protocol assignments
NOT_PUBLIC = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("192.0.0.0/24"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (IPv4-mapped, 6to4, NAT64), which is where it leads."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_allowed(address: str, allow_private: bool) -> bool:
    """Public unicast addresses only, unless private hosts are explicitly allowed; an IPv6
    address that carries an IPv4 one is judged by that one too."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if allow_private:
        return not ip.is_multicast and not ip.is_unspecified
    embedded = _embedded_ipv4(ip)
    if embedded is not None and not address_allowed(str(embedded), allow_private):
        return False
    return (
        ip.is_global and not ip.is_multicast and not any(ip in net for net in NOT_PUBLIC if ip.version == net.version)
    )


def host_literal_allowed(host: str, allow_private: bool) -> bool:
    """IP-literal hosts skip DNS, so the resolver never sees them: check them here."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return True  # a name: the guarded resolver checks what it resolves to
    return address_allowed(host.strip("[]"), allow_private)


def sniff(head: bytes) -> tuple[str, str] | None:
    """(mime, extension) from magic bytes; None for anything that is not an image we keep."""
    for magic, mime, ext in MAGIC:
        if head.startswith(magic):
            return mime, ext
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp", "webp"
    return None


class GuardedResolver(AbstractResolver):
    """DNS resolution that drops disallowed addresses, so a rebinding trick cannot slip through."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = DefaultResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if address_allowed(r["host"], self._allow_private)]
        if not allowed:
            raise BlockedAddress(f"{host} resolves only to non-public addresses")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def resolver_kwargs() -> dict[str, Any]:
    """Keyword arguments for TCPConnector that keep DNS answers cached."""
    return {"ttl_dns_cache": 300, "use_dns_cache": True}
