"""finops' own budget alerts (the gateway emits none): evaluate, queue, sign, deliver.

``policies.alerts`` decides; this package persists (``store``), sends (``deliver``) and
runs one check end to end (``engine``).
"""

from controller.alerting.deliver import DeliveryPolicy
from controller.alerting.engine import AlertCheckResult, alert_state, check_alerts, delivery_log, delivery_status
from controller.alerting.store import Attempt, FiredAlert, RouteStatus

__all__ = [
    "AlertCheckResult",
    "Attempt",
    "DeliveryPolicy",
    "FiredAlert",
    "RouteStatus",
    "alert_state",
    "check_alerts",
    "delivery_log",
    "delivery_status",
]
