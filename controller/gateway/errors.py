"""Typed gateway errors, mapped from RFC 9457 problem+json.

The gateway has no machine ``code`` field: the code is the last path segment of ``type``
(e.g. ``budget-exceeded``). Everything above the client speaks in these types, never in
status codes.
"""

from __future__ import annotations

from controller.errors import FinopsError


class GatewayError(FinopsError):
    """A request to the gateway failed; ``code`` is the problem type's last segment."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "",
        method: str = "",
        path: str = "",
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.method = method
        self.path = path
        self.retry_after = retry_after
        where = f"{method} {path}".strip()
        prefix = f"gateway {status} {code}".strip() if status else "gateway"
        super().__init__(f"{prefix}: {message}" + (f" ({where})" if where else ""))
        self.detail = message


class AuthenticationFailed(GatewayError):
    """401: the key is missing, unknown, expired or revoked."""


class Forbidden(GatewayError):
    """403: ownership, scope, tier, admin-only, frozen wallet, deposit limit."""


class NotAdmin(Forbidden):
    """The configured key lacks the ``admin`` scope that finops needs."""


class NotFound(GatewayError):
    """404: missing wallet or resource."""


class BudgetExceeded(GatewayError):
    """402 budget-exceeded: the caller's rolling-window spend would pass its cap."""


class InsufficientBalance(GatewayError):
    """402 insufficient-balance."""


class Conflict(GatewayError):
    """409: already exists / idempotency key reused."""


class InvalidRequest(GatewayError):
    """400/422: the gateway rejected the request body or parameters."""


class RateLimited(GatewayError):
    """429: retried with backoff; the gateway sends no Retry-After on REST routes."""


class ServerError(GatewayError):
    """5xx: retried for safe requests; an unknown outcome for writes."""


class Unreachable(GatewayError):
    """The gateway could not be reached (connect error, DNS, TLS)."""


class Fenced(Unreachable):
    """Not sent: this finops lost the writer lock (``controller.state.lock``), so it makes no
    further gateway write. Never retried; the request provably did not leave the process."""


class UnknownOutcome(GatewayError):
    """A non-idempotent write may or may not have happened (timeout, dropped response).

    Callers must re-observe before deciding anything; the client already did so for
    deposits, so this surfaces only when even the look-up failed.
    """


class ProtocolViolation(GatewayError):
    """The gateway answered with something we cannot trust (bad JSON, missing fields)."""


_BY_STATUS: dict[int, type[GatewayError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: InvalidRequest,
    413: InvalidRequest,
    422: InvalidRequest,
    428: InvalidRequest,
    429: RateLimited,
}


def error_class(status: int, code: str) -> type[GatewayError]:
    """Pick the most specific error type for a status and problem code."""
    if status == 402:
        return BudgetExceeded if code == "budget-exceeded" else InsufficientBalance
    if status == 403 and code in {"forbidden-admin-only", "admin-only"}:
        return NotAdmin
    if status >= 500:
        return ServerError
    return _BY_STATUS.get(status, GatewayError)
