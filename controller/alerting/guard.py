"""Alert receivers are checked again at the moment finops connects to them.

``policies.urls`` judges a URL without DNS, at validation and before each send. A name can
still resolve to an internal address (``127.0.0.1.nip.io``, a search-domain expansion, a DNS
record changed after validation: "DNS rebinding"). So every connection an alert delivery
opens goes through :class:`GuardedBackend`, an httpcore network backend that:

1. normalises the host exactly as ``policies.urls`` does (httpx hands it over already
   IDNA-encoded);
2. resolves it once, through an injectable :data:`Resolver` (the system resolver by default;
   tests inject their own, so no test depends on DNS);
3. refuses the connection when **any** resolved address is not a global unicast address
   (the OS could pick any of them), naming the address and why;
4. connects to the address it checked, never to the name, so a second lookup cannot swap
   in another answer. TLS still verifies the certificate against the URL's host name (SNI
   and verification use the request's origin, not the connected address).

Routes with ``allowInsecure: true`` are still resolved once and pinned, but their addresses
are not judged. The residual risk is what any client has: the checked address itself may
be a public address that forwards to an internal one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence

import httpcore
import httpx

from policies.urls import IPAddress, UnsafeHost, address_problem, host_problem, normalise_host, parse_ip

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port) -> addresses`` as text; raise ``OSError`` when the name does not resolve."""


class AddressRefused(Exception):
    """The receiver's host is, or resolves to, an address alerts must not be sent to."""


async def system_resolver(host: str, port: int) -> Sequence[str]:
    """The operating system's resolver (``getaddrinfo``), run off the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolve, check every address, connect to a checked one (module doc)."""

    def __init__(self, resolver: Resolver, *, enforce: bool, inner: httpcore.AsyncNetworkBackend | None = None):
        self._resolver = resolver
        self._enforce = enforce
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def addresses(self, host: str, port: int) -> list[IPAddress]:
        """The checked addresses ``host`` reaches; raises ``AddressRefused`` or
        ``httpcore.ConnectError`` (no answer from the resolver)."""
        try:
            normal = normalise_host(host)
        except UnsafeHost as exc:
            raise AddressRefused(str(exc)) from None
        literal = parse_ip(normal)
        if literal is not None:
            found: list[IPAddress] = [literal]
        else:
            if self._enforce and (problem := host_problem(normal)):
                raise AddressRefused(problem)
            try:
                answers = await self._resolver(normal, port)
            except OSError as exc:
                raise httpcore.ConnectError(f"cannot resolve {normal}: {exc}") from None
            found = []
            for answer in answers:
                try:
                    found.append(ipaddress.ip_address(answer.split("%", 1)[0]))
                except ValueError:
                    raise AddressRefused(f"host {normal} resolved to {answer!r}, not an address") from None
            if not found:
                raise httpcore.ConnectError(f"cannot resolve {normal}: no addresses")
        if self._enforce:
            for address in found:
                problem = address_problem(address)
                if problem:
                    shown = normal if literal is not None else f"{normal} resolves to {address}, which"
                    raise AddressRefused(f"host {shown} is {problem}")
        return list(dict.fromkeys(found))

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        last: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in await self.addresses(host, port):
            try:
                return await self._inner.connect_tcp(str(address), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None  # addresses() never returns an empty list
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise AddressRefused("alerts are never sent to a unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own HTTP transport (TLS, HTTP/1.1, pooling, error mapping), with every
    connection opened through a :class:`GuardedBackend`. No proxy: a proxy would make the
    connection, out of the guard's sight."""

    def __init__(
        self,
        resolver: Resolver = system_resolver,
        *,
        enforce: bool = True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        # httpx's __init__ is not called: it would build a pool (and load the CA bundle)
        # only for it to be replaced; the transport's methods use nothing but ``_pool``.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context if ssl_context is not None else httpx.create_ssl_context(),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=GuardedBackend(resolver, enforce=enforce),
        )
