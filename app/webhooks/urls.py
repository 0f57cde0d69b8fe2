"""Which URLs a webhook may be sent to.

A webhook makes this server send requests to an address a tenant chose, so without limits it is a way into
the server's network (server-side request forgery). The operator lists the hosts deliveries may reach
(``RESTORELCC_WEBHOOK_ALLOWED_HOSTS``); on top of that some addresses are never reachable, whatever the list
says: cloud metadata endpoints (they hand out credentials), link-local, unspecified, multicast and broadcast
addresses, in any spelling (IPv4-mapped IPv6, decimal or octal IPv4) and, with ``resolve=True``, behind any
host name. Messages say which rule refused which host: the API shows them to the tenant in a 422.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_HOSTS_SETTING = "RESTORELCC_WEBHOOK_ALLOWED_HOSTS"
DEFAULT_PORTS = {"http": 80, "https": 443}

METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


class UrlRefused(ValueError):
    """A webhook URL this server will not send to; ``str()`` is a message fit for the API's 422."""


def _ip_reason(addr: IPAddress) -> str | None:
    """Why ``addr`` may never be reached (None when it may), looking through IPv6 forms that carry an IPv4."""
    if addr in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if addr.is_unspecified or (addr.version == 4 and addr in _THIS_NETWORK):
        return "an unspecified address"
    if addr.is_link_local:
        return "a link-local address"
    if addr.is_multicast:
        return "a multicast address"
    if addr == _BROADCAST:
        return "the broadcast address"
    if addr.version == 6:
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            reason = _ip_reason(embedded)
            if reason is not None:
                return f"{reason} ({embedded}) in IPv6 form"
    return None


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that ``addr`` stands for when the system (or a NAT64 gateway) would reach it over IPv4."""
    if addr.ipv4_mapped is not None:  # ::ffff:a.b.c.d
        return addr.ipv4_mapped
    if addr in _NAT64:  # 64:ff9b::a.b.c.d, translated by a NAT64 gateway
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    value = int(addr)
    if 1 < value <= 0xFFFFFFFF:  # deprecated IPv4-compatible ::a.b.c.d (:: and ::1 are themselves)
        return ipaddress.IPv4Address(value)
    return None


def _never(host: str, addr: IPAddress, via: str = "") -> UrlRefused:
    return UrlRefused(f"host '{host}'{via} is {_ip_reason(addr)}; webhooks are never sent there, "
                      "even to an allowed host")


def _literal(host: str) -> IPAddress | None:
    """``host`` as an IP address when it is written as one in canonical form; refuses other IPv4 spellings.

    ``socket.inet_aton`` (and so most HTTP clients and resolvers) reads ``2852039166``, ``0xa9fea9fe``,
    ``0251.0376.0251.0376`` or ``169.254.43518`` as 169.254.169.254; such a host would slip past a check that
    compares strings, so any form other than dotted-decimal is refused outright.
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        packed = socket.inet_aton(host)
    except (OSError, ValueError):
        packed = None
    last = host.rsplit(".", 1)[-1]
    if packed is not None:
        meant = ipaddress.IPv4Address(packed)
        reason = _ip_reason(meant)
        if reason is not None:
            raise UrlRefused(f"host '{host}' is another way of writing {meant}, {reason}; webhooks are never "
                             "sent there, even to an allowed host")
        raise UrlRefused(f"host '{host}' is another way of writing {meant}; write IPv4 addresses in "
                         "dotted-decimal form (a.b.c.d)")
    if host.isdigit() or last.isdigit() or last.startswith("0x"):
        raise UrlRefused(f"host '{host}' looks like an IPv4 address but is not a valid one; write IPv4 addresses "
                         "in dotted-decimal form (a.b.c.d) or use a host name")
    return None


def _parse_entry(entry: str) -> tuple[str, int | None] | None:
    """An allow-list entry as (host, port or None for any port); None when the entry cannot be read."""
    entry = entry.strip().lower()
    if not entry:
        return None
    port_text = ""
    if entry.startswith("["):
        host, sep, rest = entry[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
        if rest and not port_text:
            return None
    elif entry.count(":") == 1:
        host, port_text = entry.split(":")
        if not port_text:
            return None
    else:
        host = entry  # a name, an IPv4 address, or an IPv6 address without brackets (no port then)
    port: int | None = None
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    return _canonical(host), port


def _canonical(host: str) -> str:
    """The host as compared with the allow-list: IP addresses in their canonical text, names lower-cased."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as e:
        raise UrlRefused(f"host '{host}' does not resolve ({e})") from None
    addresses = []
    for info in infos:
        try:
            addresses.append(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
        except ValueError:
            continue
    if not addresses:
        raise UrlRefused(f"host '{host}' does not resolve to any IP address")
    return addresses


def check_url(url: str, allowed_hosts: list[str], resolve: bool = False) -> list[IPAddress]:
    """Raise :class:`UrlRefused` unless a webhook may be sent to ``url``; return the addresses checked (the literal
    address, or with ``resolve`` every address the name resolves to; else none), so the sender can connect to one of
    them and not look the name up again.

    ``allowed_hosts`` entries are ``host`` (any port) or ``host:port`` (IPv6: ``[::1]:8080`` or ``[::1]``).
    ``resolve=True`` also looks the host name up and checks every address it has, so a name pointing at a
    metadata or link-local address is refused too (done at send time; the API checks without it, so a name
    that only resolves inside the network is accepted).
    """
    entries = [e for e in (_parse_entry(h) for h in allowed_hosts) if e is not None]
    if not any(h.strip() for h in allowed_hosts):
        raise UrlRefused(f"webhooks are not enabled on this server: {ALLOWED_HOSTS_SETTING} is empty")
    if not isinstance(url, str) or not url:
        raise UrlRefused("the URL is empty")
    if any(c <= " " or c == "\x7f" or c == "\\" for c in url):
        # Parsers disagree about these (urllib drops tabs and newlines, others keep them or split at '\'):
        # what is checked must be what is sent.
        raise UrlRefused("the URL contains spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
        explicit_port = parts.port
    except ValueError as e:
        raise UrlRefused(f"the URL cannot be read: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UrlRefused(f"scheme '{parts.scheme}' is not allowed: webhook URLs must use http or https"
                         if scheme else "the URL has no scheme: webhook URLs must start with http:// or https://")
    if "@" in parts.netloc:
        raise UrlRefused("the URL must not contain a user name or password (user:password@host); "
                         "a delivery is authenticated by its signature header")
    host = parts.hostname
    if not host:
        raise UrlRefused("the URL has no host")
    port = explicit_port if explicit_port is not None else DEFAULT_PORTS[scheme]

    addr = _literal(host)
    if addr is not None and _ip_reason(addr) is not None:
        raise _never(host, addr)
    if addr is None and "%" in host:
        raise UrlRefused(f"host '{host}' contains percent-encoding; write the host name plainly")
    name = _canonical(host)
    if not any(h == name and (p is None or p == port) for h, p in entries):
        raise UrlRefused(f"host '{host}' port {port} is not in this server's webhook allow-list "
                         f"({ALLOWED_HOSTS_SETTING})")
    if addr is not None:
        return [addr]
    if not resolve:
        return []
    resolved_all = _resolve(host, port)
    for resolved in resolved_all:
        if _ip_reason(resolved) is not None:
            raise _never(host, resolved, via=f" resolves to {resolved}, which")
    return resolved_all
