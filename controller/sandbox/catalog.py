"""The gateway's catalog (tiers, tools, scopes, currencies, limits) and its wire formats
for money and time, as GreenHelix 1.4.8 defines them (API.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal

from controller.sandbox.records import to_atomic

GATEWAY_VERSION = "1.4.8-sandbox"
PROBLEM_TYPE_BASE = "https://api.greenhelix.net/errors/"
MAX_BODY_BYTES = 1024 * 1024
KEY_GRACE_SECONDS = 300.0
KEY_AGE_WARNING_SECONDS = 90 * 86400.0
DAY_SECONDS = 86400.0
MONTH_SECONDS = 30 * 86400.0
WEBHOOK_RETRY_BASE_SECONDS = 10.0
AGENT_ID_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,127}$"
FORBIDDEN_DETAIL = "Forbidden: you do not have access to this resource"
ADMIN_TIER = "admin"

CENT = Decimal("0.01")
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


# --------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class TierConfig:
    rate_limit_per_hour: int
    burst_allowance: int
    deposit_limit: int


TIERS: dict[str, TierConfig] = {
    "free": TierConfig(100, 10, 1_000),
    "starter": TierConfig(1_000, 25, 10_000),
    "pro": TierConfig(10_000, 100, 100_000),
    "enterprise": TierConfig(100_000, 1_000, 10_000_000),
}
TIER_ORDER = {"free": 0, "starter": 1, "pro": 2, "enterprise": 3}
# _create_api_key's ranking: unknown names are 0 for the caller but 99 when requested,
# which is why an enterprise caller can mint only free keys and admin no enterprise key.
KEY_RANK = {"free": 0, "starter": 1, "pro": 2, "admin": 3}

_READ_PREFIXES = ("get_", "search_", "list_", "verify_", "check_", "estimate_", "best_match", "describe_", "explain_")
_ADMIN_SCOPE_TOOLS = frozenset({"backup_database", "restore_database", "check_db_integrity", "list_backups"})
SCOPE_LEVEL = {"read": 0, "write": 1, "admin": 2}


def required_scope(tool_name: str) -> str:
    """The gateway derives a tool's scope from its name (API.md §2.3)."""
    if tool_name in _ADMIN_SCOPE_TOOLS:
        return "admin"
    if tool_name.startswith(_READ_PREFIXES):
        return "read"
    return "write"


@dataclass(frozen=True)
class Tool:
    name: str
    tier_required: str = "free"
    price: Decimal = Decimal("0")
    admin_only: bool = False
    rate_limit_per_hour: int | None = None

    @property
    def scope(self) -> str:
        return required_scope(self.name)

    @property
    def price_atomic(self) -> int:
        return to_atomic(self.price)


TOOLS: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool("create_wallet"),
        Tool("get_balance"),
        Tool("deposit"),
        Tool("withdraw"),
        Tool("freeze_wallet", tier_required="pro", admin_only=True),
        Tool("unfreeze_wallet", tier_required="pro", admin_only=True),
        Tool("get_transactions"),
        Tool("set_budget_cap"),
        Tool("get_budget_status"),
        Tool("get_usage_summary"),
        Tool("get_metrics_timeseries"),
        Tool("get_agent_leaderboard"),
        Tool("get_exchange_rate"),
        Tool("create_api_key", rate_limit_per_hour=20),
        Tool("list_api_keys", admin_only=True),
        Tool("revoke_api_key", admin_only=True),
        Tool("rotate_key", admin_only=True, rate_limit_per_hour=10),
        Tool("register_webhook", tier_required="pro"),
        Tool("list_webhooks", tier_required="pro"),
        Tool("delete_webhook", tier_required="pro"),
        Tool("get_webhook_deliveries", tier_required="pro"),
        Tool("test_webhook"),
        Tool("best_match", price=Decimal("0.10")),
    )
}

# Default exchange rates of products/billing/exchange.py, expressed as X -> CREDITS;
# the inverse direction is 1/rate at Decimal's default 28-digit precision.
_CREDIT_RATES: dict[str, Decimal] = {
    "USD": Decimal("100"),
    "EUR": Decimal("110"),
    "GBP": Decimal("125"),
    "BTC": Decimal("6000000"),
    "ETH": Decimal("400000"),
}
CURRENCIES = ("CREDITS", *_CREDIT_RATES)
CURRENCY_DECIMAL_PLACES = {"CREDITS": 2, "USD": 2, "EUR": 2, "GBP": 2, "BTC": 8, "ETH": 8}


def exchange_rate(from_currency: str, to_currency: str) -> Decimal:
    """Direct rate, else a two-hop pivot through CREDITS, like the gateway."""
    if from_currency == to_currency:
        return Decimal("1")
    if to_currency == "CREDITS":
        return _CREDIT_RATES[from_currency]
    if from_currency == "CREDITS":
        return Decimal("1") / _CREDIT_RATES[to_currency]
    return _CREDIT_RATES[from_currency] * (Decimal("1") / _CREDIT_RATES[to_currency])


# --------------------------------------------------------------------------- serialisation


def money(value: Decimal) -> str:
    """The gateway's money fields: 2-dp strings, rounded half-even."""
    return str(value.quantize(CENT, rounding=ROUND_HALF_EVEN))


def number(value: Decimal) -> int | float:
    """Fields the gateway leaves as JSON numbers (caps, spend): ints when integral."""
    if value == value.to_integral_value():
        return int(value)
    return float(value)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat()


def format_float(value: Decimal) -> str:
    """Python float repr, as the gateway puts floats into error messages ("0.1", "70.5")."""
    return repr(float(value))
