from decimal import Decimal

from policies.guardrails import check_caps_within_total, check_funding_ceiling


def test_funding_ceiling_reports_the_excess() -> None:
    ok = check_funding_ceiling("f", "USD", {"a": Decimal("200.00"), "b": Decimal("300.00")}, Decimal("500.00"))
    assert ok == []
    [violation] = check_funding_ceiling("f", "USD", {"a": Decimal("200.00"), "b": Decimal("300.01")}, Decimal("500.00"))
    assert violation.rule == "funding-ceiling"
    assert "500.01 USD" in violation.message and "0.01 USD over" in violation.message


def test_cap_over_fleet_total_names_agent_and_excess() -> None:
    caps = [("a", Decimal("200.00")), ("b", Decimal("250.00"))]
    [violation] = check_caps_within_total("f", "USD", caps, Decimal("200.00"))
    assert violation.rule == "cap-over-fleet-total"
    assert "b's daily cap to 250.00 USD, 50.00 USD over" in violation.message
