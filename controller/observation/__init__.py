"""The daemon's shared, age-stamped observation of the fleet and the change feed that keeps
it current (``store``, ``feed``, ``watch``)."""

from controller.observation.store import (
    ALL_FIELDS,
    AgentView,
    Ensured,
    Field,
    Freshness,
    ObservationStore,
    Reading,
    SharedRead,
)

__all__ = ["ALL_FIELDS", "AgentView", "Ensured", "Field", "Freshness", "ObservationStore", "Reading", "SharedRead"]
