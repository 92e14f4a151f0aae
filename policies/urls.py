"""Is a URL safe to send alerts to? The gateway's SSRF rules (API.md §7), as a pure check.

finops applies the same rules to its own alert deliveries so a manifest cannot point signed
alerts at internal services, and to gateway webhooks because the gateway would refuse them
anyway (better to fail in ``finops validate`` than mid-apply). Only literal addresses and
well-known local names are judged: resolving DNS here would make validation depend on the
network, and the gateway itself accepts names that do not resolve.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

BLOCKED_HOSTNAMES = frozenset({"localhost", "localhost.localdomain", "metadata.google.internal", "ip6-localhost"})

#: One part of an IPv4 address as ``inet_aton`` reads it: hex, octal (leading 0) or decimal.
_INET_ATON_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The address of a legacy IPv4 literal (``127.1``, ``2130706433``, ``0x7f000001``,
    ``0177.0.0.1``): HTTP clients resolve these through ``inet_aton``, so they reach the same
    hosts as the dotted-quad forms the rules are written for."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_INET_ATON_PART.fullmatch(p) for p in parts):
        return None
    values = [int(p, 16) if p[:2].lower() == "0x" else int(p, 8) if p[:1] == "0" else int(p) for p in parts]
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (5 - len(parts))):
        return None
    number = last
    for i, v in enumerate(head):
        number |= v << (24 - 8 * i)
    return ipaddress.IPv4Address(number)


def _blocked_ip(host: str) -> str | None:
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        legacy = _legacy_ipv4(host)
        if legacy is None:
            return None
        blocked = _blocked_ip(str(legacy))
        return f"{blocked} ({legacy} written another way)" if blocked else None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved or ip.is_multicast or ip.is_unspecified:
        return "a reserved address"
    return None


def check_url_safety(url: str, *, allow_insecure: bool) -> str | None:
    """``None`` when ``url`` may receive alerts, else a one-line reason.

    ``allow_insecure`` (an explicit manifest opt-in, for development and tests) permits
    ``http`` and local hosts; it never permits other schemes or credentials in the URL.
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"scheme {parts.scheme or '(none)'!r} is not allowed (use https)"
    host = (parts.hostname or "").lower().rstrip(".")  # "localhost." is localhost
    if not host:
        return "URL has no host"
    if parts.username or parts.password:
        return "URL must not embed credentials"
    if allow_insecure:
        return None
    if parts.scheme != "https":
        return "must use https (set allowInsecure: true only for local development)"
    if host in BLOCKED_HOSTNAMES or host.endswith(".localhost"):
        return f"host {host!r} is local (set allowInsecure: true only for local development)"
    blocked = _blocked_ip(host)
    if blocked:
        return f"host {host} is {blocked} (set allowInsecure: true only for local development)"
    return None
