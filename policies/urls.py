"""Is a URL safe to send alerts to? The gateway's SSRF rules (API.md §7), as a pure check.

finops applies the same rules to its own alert deliveries so a manifest cannot point signed
alerts at internal services, and to gateway webhooks because the gateway would refuse them
anyway (better to fail in ``finops validate`` than mid-apply).

The rules judge the host **as the HTTP stack will see it**, not as it is written:

- the host is normalised first (:func:`normalise_host`): IDNA/UTS-46 mapping, so full-width
  and ideographic dots (``127。0。0。1``, ``127．0．0．1``) and full-width digits or letters
  become the ASCII an HTTP client sends to the resolver; case folded; one trailing dot
  dropped. A host that cannot be normalised unambiguously (percent-encoding, a backslash,
  an empty label, an IPv6 zone id, characters outside letters, digits, ``-`` and ``_``) is
  refused rather than guessed at;
- IP literals in every form a resolver accepts (dotted quad, ``127.1``, ``2130706433``,
  ``0x7f.0.0.1``, ``0177.0.0.1``, IPv4-mapped/6to4/NAT64 IPv6) are judged by the address
  they reach (:func:`address_problem`): anything that is not a global unicast address is
  refused, including carrier-grade NAT 100.64.0.0/10 (which holds cloud metadata
  100.100.100.200);
- names that reach this machine or a local network without DNS are refused: ``localhost``
  and ``*.localhost`` (RFC 6761), the well-known ``/etc/hosts`` names
  (:data:`BLOCKED_HOSTNAMES`), special-use private suffixes (:data:`LOCAL_SUFFIXES`:
  ``.local``, ``.internal``, ``.home.arpa``…) and single-label names (resolved through
  local search domains: ``_gateway``, ``metadata``, the machine's own name).

Other hostnames are not resolved here: validation must not depend on the network, and the
gateway itself accepts names that do not resolve. Alert delivery resolves each name right
before connecting, checks every address with :func:`address_problem`, and connects to the
address it checked (``controller/alerting/guard.py``).
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

import idna

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Names that map to this host without DNS: RFC 6761 plus what distributions put in
#: ``/etc/hosts`` (Debian, RHEL, Alpine) and what systemd-resolved synthesises.
BLOCKED_HOSTNAMES = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "localhost4",
        "localhost4.localdomain4",
        "localhost6",
        "localhost6.localdomain6",
        "ip6-localhost",
        "ip6-loopback",
        "ip6-localnet",
        "ip6-mcastprefix",
        "ip6-allnodes",
        "ip6-allrouters",
        "ip6-allhosts",
        "metadata.google.internal",
    }
)

#: Special-use or private-use suffixes: names under them never resolve to the public
#: internet (RFC 6761 ``localhost``, RFC 6762 ``local`` (mDNS), RFC 8375 ``home.arpa``,
#: ICANN's private-use ``internal`` (cloud metadata and Docker's ``host.docker.internal``)
#: and the de-facto private ``localdomain``, ``lan``, ``intranet``, ``corp``, ``home``).
LOCAL_SUFFIXES = ("localhost", "local", "localdomain", "internal", "home.arpa", "lan", "intranet", "corp", "home")

#: Carrier-grade NAT (RFC 6598): neither private nor global to Python, refused by name.
SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")
#: IANA special-purpose blocks that Python 3.11's registry still calls global.
_SPECIAL_PURPOSE_V4 = (ipaddress.IPv4Network("192.0.0.0/24"), ipaddress.IPv4Network("192.88.99.0/24"))
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")

#: One part of an IPv4 address as ``inet_aton`` reads it: hex, octal (leading 0) or decimal.
_INET_ATON_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")
#: A normalised DNS name: labels of letters, digits, ``-`` and ``_``.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
#: Characters that are legal in an authority (RFC 3986) plus non-ASCII (IDNA input).
_AUTHORITY_UNSAFE = re.compile(r"[\x00-\x20\\\x7f\"<>^`{|}]")
_HINT = " (set allowInsecure: true only for local development)"


class UnsafeHost(ValueError):
    """The host cannot be normalised the way an HTTP client would, so it is refused."""


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


def parse_ip(host: str) -> IPAddress | None:
    """The address a normalised ``host`` names literally (any form a resolver accepts
    without DNS), or ``None`` for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return _legacy_ipv4(host)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """An IPv4 address a v6 address carries and routes to (mapped, 6to4, NAT64)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    if ip.teredo is not None:
        return ip.teredo[1], "Teredo"
    return None


def address_problem(ip: IPAddress) -> str | None:
    """``None`` when ``ip`` is a global unicast address, else what it is.

    The check is deny-by-default: anything Python's registry does not call global is
    refused, and carrier-grade NAT, multicast and addresses embedded in IPv6 transition
    forms are judged explicitly."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            inner, how = embedded
            problem = address_problem(inner)
            if problem is None:
                return None if how != "Teredo" else "a Teredo address"
            return problem if how == "IPv4-mapped" else f"{problem} ({inner} inside a {how} address)"
        if ip in _NAT64_LOCAL:
            return "a local-use NAT64 address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved or ip.is_multicast or ip.is_unspecified:
        return "a reserved address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in SHARED_ADDRESS_SPACE:
        return "a carrier-grade NAT address (100.64.0.0/10, which holds cloud metadata 100.100.100.200)"
    if not ip.is_global or (isinstance(ip, ipaddress.IPv4Address) and any(ip in n for n in _SPECIAL_PURPOSE_V4)):
        return "a special-purpose address"
    return None


def _idna(host: str, *, uts46: bool) -> str | None:
    try:
        return idna.encode(host, uts46=uts46, std3_rules=False, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return None


def normalise_host(host: str) -> str:
    """``host`` (as written in a URL, without user-info or port) as an HTTP client sends it
    to the resolver: IDNA/UTS-46 mapped to ASCII, lower case, no trailing dot; IPv6
    literals without brackets. Raises :class:`UnsafeHost` when the
    host has no single such form."""
    if not host:
        raise UnsafeHost("URL has no host")
    if _AUTHORITY_UNSAFE.search(host):
        raise UnsafeHost(f"host {host!r} contains characters a URL host cannot hold")
    if "%" in host:
        raise UnsafeHost(f"host {host!r} is percent-encoded or carries an IPv6 zone id")
    if host.startswith("[") or ":" in host:
        literal = host.removeprefix("[").removesuffix("]").lower()
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise UnsafeHost(f"host {host!r} is not a valid IPv6 address") from None
        return literal
    if host.isascii():
        ascii_host = host.lower()
    else:
        # httpx encodes with IDNA 2008 (splitting on the Unicode full stops too); browsers and
        # other stacks apply the UTS-46 mapping first (full-width letters and digits). Both
        # must agree, or the host would reach different places depending on who reads it.
        mapped = _idna(host, uts46=True)
        if mapped is None:
            raise UnsafeHost(f"host {host!r} is not a valid internationalised domain name")
        plain = _idna(host.lower(), uts46=False)
        if plain is not None and plain != mapped:
            raise UnsafeHost(f"host {host!r} has no single ASCII form ({plain!r} or {mapped!r})")
        ascii_host = mapped.lower()
    if ascii_host.endswith("."):
        ascii_host = ascii_host[:-1]  # "localhost." is localhost: an absolute name
    labels = ascii_host.split(".")
    if len(ascii_host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise UnsafeHost(f"host {host!r} is not a valid host name")
    return ascii_host


def host_problem(host: str, *, written: str | None = None) -> str | None:
    """``None`` when a normalised host may be contacted without resolving it first, else
    why not (a non-global address literal, or a name that is local without DNS).
    ``written`` is the host as the URL spells it, shown too when it differs."""
    shown_ip, shown_name = host, repr(host)
    if written is not None and written.lower().rstrip(".") != host:
        shown_ip, shown_name = f"{written} (read as {host})", f"{written!r} (read as {host!r})"
    ip = parse_ip(host)
    if ip is not None:
        problem = address_problem(ip)
        if problem is None:
            return None
        if str(ip) != host and ip.version == 4:
            problem = f"{problem} ({ip} written another way)"
        return f"host {shown_ip} is {problem}"
    if host in BLOCKED_HOSTNAMES or any(host == s or host.endswith("." + s) for s in LOCAL_SUFFIXES):
        return f"host {shown_name} is local"
    if "." not in host:
        return f"host {shown_name} is a single-label name, resolved through local search domains (use a full name)"
    return None


def _authority_host(netloc: str) -> str:
    """The host of an authority as written: after the last ``@``, without the port."""
    host = netloc.rpartition("@")[2]
    return host[: host.find("]") + 1] if host.startswith("[") else host.split(":", 1)[0]


def check_url_safety(url: str, *, allow_insecure: bool) -> str | None:
    """``None`` when ``url`` may receive alerts, else a one-line reason.

    ``allow_insecure`` (an explicit manifest opt-in, for development and tests) permits
    ``http`` and local hosts; it never permits other schemes, credentials in the URL or a
    host that cannot be normalised.
    """
    try:
        parts = urlsplit(url)
        raw_host = _authority_host(parts.netloc)
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"scheme {parts.scheme or '(none)'!r} is not allowed (use https)"
    if not raw_host:
        return "URL has no host"
    if "@" in parts.netloc:
        return "URL must not embed credentials"
    try:
        host = normalise_host(raw_host)
    except UnsafeHost as exc:
        return str(exc)
    if allow_insecure:
        return None
    if parts.scheme != "https":
        return "must use https" + _HINT
    problem = host_problem(host, written=raw_host.strip("[]"))
    return problem + _HINT if problem else None


def is_loopback_host(host: str) -> bool:
    """Whether a URL host (as written) reaches only this machine: a loopback address in any
    form, or ``localhost``/``*.localhost``/the ``/etc/hosts`` loopback names. Used to allow
    plain ``http`` to a local gateway (the embedded sandbox, a port-forward)."""
    try:
        normal = normalise_host(host)
    except UnsafeHost:
        return False
    ip = parse_ip(normal)
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback
    return normal in {"localhost", "localhost4", "localhost6", "ip6-localhost", "ip6-loopback"} or normal.endswith(
        ".localhost"
    )
