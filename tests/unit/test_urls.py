"""URL safety judged on the host as the HTTP stack sees it (policies/urls.py)."""

from __future__ import annotations

import ipaddress
import socket

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.urls import (
    UnsafeHost,
    address_problem,
    check_url_safety,
    is_loopback_host,
    normalise_host,
    parse_ip,
)

FORBIDDEN_V4 = [
    "127.0.0.1",
    "127.8.9.10",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "100.100.100.200",
    "100.127.255.254",
    "0.0.0.0",
    "224.0.0.1",
    "239.255.255.250",
    "255.255.255.255",
    "192.0.2.1",
    "198.18.0.1",
    "240.0.0.1",
]
DOTS = [".", "。", "．", "｡"]


def refused(url: str) -> bool:
    return check_url_safety(url, allow_insecure=False) is not None


@pytest.mark.parametrize("address", FORBIDDEN_V4)
@pytest.mark.parametrize("dot", DOTS)
def test_unicode_dot_forms_of_forbidden_addresses_are_refused(address: str, dot: str) -> None:
    url = f"https://{address.replace('.', dot)}/alerts"
    assert refused(url), url
    # and the HTTP client really would reach the forbidden address: the rule judges what it judges
    assert httpx.URL(url).host == address


@pytest.mark.parametrize(
    "url",
    [
        "https://１２７.０.０.１/",  # full-width digits
        "https://ｌｏｃａｌｈｏｓｔ/",  # full-width letters
        "https://LOCALHOST./",
        "https://LocalHost/",
        "https://foo.localhost/",
        "https://localhost.localdomain/",
        "https://ip6-localhost/",
        "https://ip6-loopback/",
        "https://localhost6.localdomain6/",
        "https://metadata.google.internal/computeMetadata/v1/",
        "https://host.docker.internal/",
        "https://printer.local/",
        "https://nas.home.arpa/",
        "https://metadata/",  # single label: resolved through search domains
        "https://_gateway/",  # systemd-resolved's name for the default gateway
        "https://%31%32%37.0.0.1/",  # percent-encoded host
        "https://127.0.0.1%2F/",
        "https://[fe80::1%25eth0]/",  # zone id
        "https://evil.example\\.127.0.0.1/",
        "https://ex..example.com/",
        "https://example.com../",
        "https://[::ffff:127.0.0.1]/",
        "https://[::ffff:7f00:1]/",
        "https://[::ffff:169.254.169.254]/",
        "https://[2002:7f00:1::1]/",  # 6to4 of 127.0.0.1
        "https://[2002:a9fe:a9fe::]/",  # 6to4 of 169.254.169.254
        "https://[64:ff9b::7f00:1]/",  # NAT64 of 127.0.0.1
        "https://[64:ff9b::6464:64c8]/",  # NAT64 of 100.100.100.200
        "https://[64:ff9b:1::1]/",  # local-use NAT64
        "https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",  # Teredo
        "https://[::1]/",
        "https://[::]/",
        "https://[fc00::1]/",
        "https://[fe80::1]/",
        "https://[ff02::1]/",
        "https://[2001:db8::1]/",
        "https://127.1/",
        "https://0x7f.1/",
        "https://0177.0.0.1/",
        "https://2130706433/",
        "https://100.100.100.200/latest/meta-data",
        "https://0x646464c8/",  # 100.100.100.200 as one hex number
    ],
)
def test_local_and_special_hosts_are_refused_in_every_spelling(url: str) -> None:
    assert refused(url), url


@pytest.mark.parametrize(
    "url",
    [
        "https://alerts.example.com/x",
        "https://ALERTS.Example.COM./x",
        "https://8.8.8.8/",
        "https://[2001:4860:4860::8888]/",
        "https://[64:ff9b::808:808]/",  # NAT64 of a public address
        "https://[2002:808:808::1]/",  # 6to4 of a public address
        "https://bücher.example/",
        "https://xn--bcher-kva.example/",
        "https://alerts.example.com:8443/x?q=1",
        "https://100.63.255.255/",  # just below 100.64.0.0/10
        "https://100.128.0.1/",  # just above it
    ],
)
def test_public_hosts_are_accepted(url: str) -> None:
    assert check_url_safety(url, allow_insecure=False) is None


def test_carrier_grade_nat_reason_names_the_range() -> None:
    problem = check_url_safety("https://100.100.100.200/", allow_insecure=False)
    assert problem is not None and "100.64.0.0/10" in problem


def test_allow_insecure_permits_local_hosts_but_never_ambiguous_ones() -> None:
    assert check_url_safety("http://127.0.0.1:9000/a", allow_insecure=True) is None
    assert check_url_safety("http://localhost/a", allow_insecure=True) is None
    assert check_url_safety("http://%31%32%37.0.0.1/", allow_insecure=True) is not None
    assert check_url_safety("http://user@127.0.0.1/", allow_insecure=True) is not None
    assert check_url_safety("ftp://127.0.0.1/", allow_insecure=True) is not None


def test_normalise_host_matches_httpx_for_unicode_dots_and_case() -> None:
    for written in ["Alerts。Example．COM", "alerts.example.com.", "ALERTS.EXAMPLE.COM"]:
        assert normalise_host(written) == "alerts.example.com"
    with pytest.raises(UnsafeHost):
        normalise_host("")
    with pytest.raises(UnsafeHost):
        normalise_host("a b.example")


def test_address_problem_is_deny_by_default() -> None:
    assert address_problem(ipaddress.ip_address("93.184.216.34")) is None
    for text in ["100.64.0.0", "192.0.0.8", "::ffff:10.1.1.1", "fd00::1", "::"]:
        assert address_problem(ipaddress.ip_address(text)) is not None, text


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1", True),
        ("[::1]", True),
        ("::1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("api.localhost", True),
        ("127。0。0。1", True),
        ("[::ffff:127.0.0.1]", True),
        ("10.0.0.1", False),
        ("api.greenhelix.net", False),
        ("localhost.example.com", False),
        ("%6c%6fcalhost", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


# --------------------------------------------------------------------------- invariants


def _reached_address(url: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address an HTTP client would connect to without DNS: httpx's own host
    normalisation, then the resolver's numeric parsing (``inet_aton`` for IPv4 forms)."""
    try:
        host = httpx.URL(url).host
    except (httpx.InvalidURL, ValueError):
        return None
    host = host.rstrip(".")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


_octet = st.integers(0, 255)
_forbidden_ip = st.one_of(
    st.sampled_from(FORBIDDEN_V4),
    st.builds(lambda a, b, c: f"127.{a}.{b}.{c}", _octet, _octet, _octet),
    st.builds(lambda a, b: f"10.{a}.{b}.1", _octet, _octet),
    st.builds(lambda a, b: f"100.{64 + a % 64}.{b}.1", _octet, _octet),
    st.builds(lambda a, b: f"169.254.{a}.{b}", _octet, _octet),
)


@st.composite
def _spelled(draw: st.DrawFn) -> str:
    """A forbidden IPv4 address written the ways an attacker would: any mix of Unicode full
    stops, full-width digits, upper case, a trailing dot, an IPv4-mapped IPv6 literal."""
    ip = draw(_forbidden_ip)
    form = draw(st.sampled_from(["dots", "fullwidth", "mapped", "number", "hex"]))
    if form == "mapped":
        return f"[::ffff:{ip}]"
    if form == "number":
        return str(int(ipaddress.IPv4Address(ip)))
    if form == "hex":
        return hex(int(ipaddress.IPv4Address(ip)))
    parts = ip.split(".")
    if form == "fullwidth":
        parts = ["".join(chr(ord(c) + 0xFEE0) if draw(st.booleans()) else c for c in p) for p in parts]
    out = parts[0]
    for part in parts[1:]:
        out += draw(st.sampled_from(DOTS)) + part
    return out + draw(st.sampled_from(["", "."]))


@settings(max_examples=400, deadline=None)
@given(_spelled())
def test_every_spelling_of_a_forbidden_address_is_refused(host: str) -> None:
    assert refused(f"https://{host}/alerts"), host


_ALPHABET = "0123456789abcdefx.:[]%。．｡１２７ｌｏｃａｈｓｔ-_@\\"


@settings(max_examples=600, deadline=None)
@given(
    st.one_of(
        _spelled(),
        st.text(alphabet=st.sampled_from(_ALPHABET), min_size=1, max_size=24),
    )
)
def test_any_accepted_url_reaches_only_global_addresses(host: str) -> None:
    """The invariant: whatever the rule accepts, the address an HTTP client reaches without
    DNS is global (or it reaches no literal address at all, i.e. a name)."""
    url = f"https://{host}/x"
    if check_url_safety(url, allow_insecure=False) is not None:
        return
    reached = _reached_address(url)
    if reached is not None:
        assert address_problem(reached) is None, (host, reached)
        assert parse_ip(normalise_host(httpx.URL(url).host)) == reached
