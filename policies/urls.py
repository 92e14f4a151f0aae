"""Is a URL safe to send alerts to? The gateway's SSRF rules (API.md §7), as a pure check.

finops applies the same rules to its own alert deliveries so a manifest cannot point signed
alerts at internal services, and to gateway webhooks because the gateway would refuse them
anyway (better to fail in ``finops validate`` than mid-apply). Only literal addresses and
well-known local names are judged: resolving DNS here would make validation depend on the
network, and the gateway itself accepts names that do not resolve.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

BLOCKED_HOSTNAMES = frozenset({"localhost", "localhost.localdomain", "metadata.google.internal", "ip6-localhost"})


def _blocked_ip(host: str) -> str | None:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
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
    host = (parts.hostname or "").lower()
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
