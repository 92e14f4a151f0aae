"""Spend anomalies: an agent spending well above its own trailing baseline.

The playbook's case is an agent that "quietly doubles its tool-call volume over three
weeks": no threshold fires until the cap is hit, yet the agent's behaviour has changed.
``spec.alerts.anomaly`` declares, per fleet or agent::

    anomaly: {window: 24h, baseline: 21d, multiple: 2.0, minSpend: "5.00"}

**Decision.** With ``recent`` = spend over the last ``window`` and ``baseline`` = spend over
the ``baseline`` period just before it (the recent window is not part of its own baseline),
the agent is anomalous when

    recent ≥ minSpend  and  recent / window > multiple × baseline / baselinePeriod

(rates compared, so the two periods may have any lengths). Hours without usage count as
zero: a new agent has a low baseline, which is what ``minSpend`` is for (an idle agent's
first calls are not an anomaly). Exact ``Decimal`` arithmetic, no division.

**Hysteresis.** A fired anomaly re-arms only when the agent is clearly back to normal:
``recent < REARM_FRACTION × minSpend`` or the ratio falls to ``REARM_FRACTION × multiple``
or below. A reading between the two bounds changes nothing, so an agent hovering at the
boundary alerts once, not on every check.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

REARM_FRACTION = Decimal("0.8")
"""A fired anomaly re-arms below 80 % of the trigger (ratio and minimum spend)."""


@dataclass(frozen=True)
class AnomalyPolicy:
    """``alerts.anomaly`` resolved: periods in seconds, ``min_spend`` in gateway credits."""

    window_seconds: int
    baseline_seconds: int
    multiple: Decimal
    min_spend: Decimal


@dataclass(frozen=True)
class AnomalySample:
    """Spend over the recent window and over the baseline period before it (credits)."""

    recent: Decimal
    baseline: Decimal


def _ratio_above(policy: AnomalyPolicy, sample: AnomalySample, multiple: Decimal) -> bool:
    """recent / window > multiple × baseline / baselinePeriod, without dividing."""
    return sample.recent * policy.baseline_seconds > multiple * sample.baseline * policy.window_seconds


def is_anomalous(policy: AnomalyPolicy, sample: AnomalySample) -> bool:
    """The trigger (module doc)."""
    return sample.recent >= policy.min_spend and _ratio_above(policy, sample, policy.multiple)


def has_recovered(policy: AnomalyPolicy, sample: AnomalySample) -> bool:
    """The re-arm condition of a fired anomaly (module doc); never true where
    ``is_anomalous`` is."""
    return sample.recent < REARM_FRACTION * policy.min_spend or not _ratio_above(
        policy, sample, REARM_FRACTION * policy.multiple
    )


def ratio(policy: AnomalyPolicy, sample: AnomalySample) -> Decimal | None:
    """The recent rate over the baseline rate, for display; ``None`` when the baseline is 0."""
    if sample.baseline <= 0:
        return None
    return (sample.recent * policy.baseline_seconds) / (sample.baseline * policy.window_seconds)
