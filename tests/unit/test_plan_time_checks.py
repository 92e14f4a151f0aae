"""Nothing fails half-way that could have failed at plan time: amounts out of the gateway's
range, deposits over its per-request limit, an admin's own wallet, an unusable webhook
secret, all refused by the pure planner before a single write; and every text view escapes
control characters."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from controller.cli.views import render_apply_text, render_markdown, render_text
from controller.errors import ConfigError, ManifestIssue
from controller.io.target import open_target
from controller.manifest.schema import Money, port_problem
from controller.reconcile.apply import AgentResult, Applied, ApplyResult, Failed, StepOutcome
from controller.reconcile.observe import LiveAgent
from policies.currency import to_credits
from policies.display import escape_controls, escape_lines, escape_markdown
from policies.guardrails import check_gateway_range
from policies.money import GATEWAY_MAX_AMOUNT, GATEWAY_MAX_DEPOSIT, out_of_gateway_range
from policies.plan_types import ChangeKind, PlanErrorKind
from policies.planner import Memory, make_plan
from policies.spec import GatewayWebhookSpec, SecretRef
from tests.unit.test_plan import WHEN, agent, desired, live

D = Decimal
NEW = LiveAgent("res-01", exists=False, ledger_anchor="new")
MONEY: TypeAdapter[Decimal] = TypeAdapter(Money)


# --- ranges ------------------------------------------------------------------------------------


def test_the_gateway_maximum_is_int64_atomic_units_rounded_down_to_the_cent() -> None:
    assert (D(2**63 - 1) / D(10**8)).quantize(D("0.01"), rounding="ROUND_FLOOR") == GATEWAY_MAX_AMOUNT
    assert out_of_gateway_range(GATEWAY_MAX_AMOUNT) is None
    assert out_of_gateway_range(GATEWAY_MAX_AMOUNT + D("0.01")) is not None
    assert out_of_gateway_range(D("Infinity")) is not None


@given(
    amount=st.decimals(min_value=0, max_value=GATEWAY_MAX_AMOUNT, places=2),
    rate=st.decimals(min_value=D("1e-8"), max_value=D("1e300"), allow_nan=False, allow_infinity=False),
)
def test_conversion_never_raises_and_the_range_check_decides(amount: Decimal, rate: Decimal) -> None:
    """Any finite rate the gateway could send converts without an exception (it used to
    raise decimal.InvalidOperation, a traceback in `plan`), and the result is either a
    2-dp amount the gateway can store or refused by the range check."""
    credits = to_credits(amount, rate)
    problems = check_gateway_range("research", "res-01", {"daily cap": credits})
    if credits.is_finite() and credits <= GATEWAY_MAX_AMOUNT:
        assert problems == [] and credits == credits.quantize(D("0.01"))
    else:
        assert [v.rule for v in problems] == ["amount-range"]


def test_caps_beyond_the_gateway_range_at_the_live_rate_refuse_the_plan_before_any_change() -> None:
    """A 1e9 USD monthly cap validates (it fits in USD) but is 1e11 credits at 100 per USD:
    registering the agent and then failing to cap it is exactly what must not happen."""
    huge = agent("res-01", monthly="1000000000.00")
    plan = make_plan(desired(huge, total="2000000000.00"), live(NEW), Memory(), now=WHEN)
    assert plan.changes == ()  # not even the register
    (violation,) = plan.violations
    assert violation.rule == "amount-range" and "res-01: monthly cap in credits 100000000000.00" in violation.message


def test_a_top_up_over_the_per_deposit_limit_is_refused_not_split() -> None:
    rich = agent("res-01", floor="20000000.00", target="20000000.00")  # 2e9 credits
    plan = make_plan(desired(rich, ceiling="90000000.00"), live(NEW), Memory(), now=WHEN)
    top_up = next(c for c in plan.changes if c.kind is ChangeKind.TOP_UP)
    assert top_up.args.amount > GATEWAY_MAX_DEPOSIT
    assert [v.rule for v in plan.violations] == ["deposit-limit"]
    assert "over the gateway's per-deposit maximum 1000000000.00" in plan.violations[0].message


def test_the_admin_agent_is_never_capped_or_funded() -> None:
    plan = make_plan(
        desired(agent("ops-admin"), agent("res-01")),
        live(LiveAgent("ops-admin", exists=True, balance=D("0.00")), NEW, admins=frozenset({"ops-admin"})),
        Memory(),
        now=WHEN,
    )
    assert all(c.agent_id != "ops-admin" for c in plan.changes)
    assert [v.rule for v in plan.violations] == ["admin-agent"]
    assert "ops-admin holds an admin-scoped key" in plan.violations[0].message


def test_an_unusable_webhook_secret_is_a_plan_error_for_that_agent_only() -> None:
    secret = SecretRef(file="/etc")
    hooked = agent("res-01")
    hooked = type(hooked)(
        **{
            **hooked.__dict__,
            "gateway_webhooks": (GatewayWebhookSpec("https://h.example.com/x", ("billing.deposit",), secret),),
        }
    )
    memory = Memory(secret_problems={secret: "signing secret: cannot read /etc: is a directory, not a regular file"})
    fleet = live(NEW)
    fleet = type(fleet)(**{**fleet.__dict__, "webhooks": ()})
    plan = make_plan(desired(hooked), fleet, memory, now=WHEN)
    assert ChangeKind.CREATE_WEBHOOK not in [c.kind for c in plan.changes]
    assert [c.kind for c in plan.changes] == [ChangeKind.REGISTER, ChangeKind.SET_BUDGET, ChangeKind.TOP_UP]
    assert [str(e) for e in plan.errors] == [
        "res-01: gateway webhook not planned: signing secret: cannot read /etc: is a directory, not a regular file",
    ]
    assert [(e.agent_id, e.kind) for e in plan.errors] == [("res-01", PlanErrorKind.WEBHOOK_NOT_PLANNED)]


# --- escaping ----------------------------------------------------------------------------------

HOSTILE = "evil\x1b[2J\x1b]0;owned\x07\rfake\nline\u202egnp.exe\x9b31m\x00"


@given(st.text())
def test_escaped_text_is_one_inert_line(text: str) -> None:
    out = escape_controls(text)
    assert "\n" not in out and "\r" not in out and "\x1b" not in out and "\u202e" not in out
    assert out.isprintable()
    if text.isprintable():
        assert out == text  # ordinary text is untouched


def test_error_lines_escape_what_the_manifest_said() -> None:
    line = str(ManifestIssue("fleet\x1b[31m.yaml", 3, "metadata.labels.note", f"unknown field '{HOSTILE}'"))
    assert "\x1b" not in line and "\n" not in line and "\u202e" not in line and "\r" not in line
    assert "fleet\\x1b[31m.yaml:3: metadata.labels.note: unknown field 'evil\\x1b[2J" in line
    assert "\\u202egnp.exe" in line
    assert escape_lines("a\x1b\nb") == "a\\x1b\nb"


def test_plans_and_apply_results_escape_every_string_they_show() -> None:
    plan = make_plan(desired(agent("res-01")), live(NEW), Memory(), now=WHEN)
    change = plan.changes[0]
    hostile = type(plan)(
        **{
            **plan.__dict__,
            "changes": (type(change)(**{**change.__dict__, "reason": HOSTILE + " | extra column"}),),
            "warnings": (HOSTILE,),
            "unmanaged_webhooks": (f"whk-1 https://x.example.com/{HOSTILE} [a|b]",),
        }
    )
    for text in (render_text(hostile), render_markdown(hostile)):
        assert "\x1b" not in text and "\r" not in text and "\u202e" not in text and "\x9b" not in text
    assert "evil\\x1b[2J" in render_text(hostile)
    # Markdown also escapes what markdown would interpret ('[' opens a link, '\\' escapes).
    assert escape_markdown(HOSTILE) in render_markdown(hostile) and "evil\\\\x1b\\[2J" in render_markdown(hostile)
    row = next(line for line in render_markdown(hostile).splitlines() if line.startswith("| + |"))
    assert row.count(" | ") == 4 and "\\| extra column" in row  # a '|' in a value opens no column
    outcomes: list[StepOutcome] = [Applied(ChangeKind.REGISTER, HOSTILE), Failed(ChangeKind.TOP_UP, HOSTILE)]
    result = ApplyResult([AgentResult("res-01", outcomes)], writes=1, reads=0)
    out = render_apply_text(result)
    assert "\x1b" not in out and "\u202e" not in out and out.count("\n") == 2  # two lines + verdict


# --- ports ---------------------------------------------------------------------------------------


def test_gateway_urls_need_a_real_port(tmp_path: Path) -> None:
    for url in ("https://gw.example.com:0", "https://gw.example.com:99999/", "https://gw.example.com:-1"):
        with (
            pytest.raises(ConfigError, match="port must be a number from 1 to 65535"),
            open_target(url, api_key_file=None, state_dir=tmp_path),
        ):
            pass  # pragma: no cover - refused on entry
    assert port_problem("https://gw.example.com:65535/x") is None
    assert port_problem("https://gw.example.com/x") is None


@settings(max_examples=300)
@given(
    st.one_of(
        st.text(alphabet="0123456789.-+eE_ ", max_size=60),
        st.integers(min_value=-(10**40), max_value=10**40),
        st.floats(allow_nan=True, allow_infinity=True),
        st.decimals(allow_nan=False, allow_infinity=False).map(str),
    )
)
def test_a_manifest_amount_is_a_gateway_storable_amount_or_a_clean_error(value: object) -> None:
    """Whatever is written, the money type gives a 2-dp amount within the gateway's range or
    a validation error with a message; never another exception (a traceback in `plan`)."""
    try:
        amount = MONEY.validate_python(value)
    except ValidationError as exc:
        assert exc.errors()[0]["msg"]
        return
    assert D(0) <= amount <= GATEWAY_MAX_AMOUNT
    assert amount == amount.quantize(D("0.01"))
