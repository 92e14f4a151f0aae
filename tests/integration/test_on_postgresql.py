"""The money-safety suites again, with finops' state in a real PostgreSQL server instead of
the SQLite file: exactly-once funding, unknown outcomes, funding limits, rebalancing,
webhook ownership and alert delivery must not depend on the backend.

The test functions are the same objects as in their own modules (imported here, so pytest
collects them again); only the ``harness`` fixture differs: its ``StateStore`` lives in a
fresh PostgreSQL database (``pg_url``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.keys.vault import KeyVault
from controller.sandbox.server import SandboxServer
from controller.state import StateStore
from controller.state.location import StateLocation
from policies.keyprint import contains_key_material
from tests.integration.conftest import Harness, state_rows
from tests.integration.test_alerts import *  # noqa: F403
from tests.integration.test_apply_outcomes import *  # noqa: F403
from tests.integration.test_exactly_once import *  # noqa: F403
from tests.integration.test_exposure import *  # noqa: F403
from tests.integration.test_fresh_state import *  # noqa: F403
from tests.integration.test_funding_limits import *  # noqa: F403
from tests.integration.test_key_recovery import *  # noqa: F403
from tests.integration.test_key_settle import *  # noqa: F403
from tests.integration.test_keys import *  # noqa: F403
from tests.integration.test_late_outcomes import *  # noqa: F403
from tests.integration.test_rebalancing import *  # noqa: F403
from tests.integration.test_reconcile import *  # noqa: F403
from tests.integration.test_webhooks import *  # noqa: F403


@pytest.fixture
def no_key_material() -> None:
    """Replaces test_keys' autouse fixture of that name (star-imported with the key suites,
    it would apply to every test here): ``harness`` below scans PostgreSQL instead."""


@pytest.fixture
def harness(sandbox: SandboxServer, tmp_path: Path, pg_url: str) -> Iterator[Harness]:
    store = StateStore(StateLocation(tmp_path / "state" / "state-sandbox.db", url=pg_url))
    yield Harness(sandbox, store, KeyVault(tmp_path / "secrets"))
    try:  # no key material ever reaches PostgreSQL (fingerprint prefixes only)
        for table, row in state_rows(store):
            assert not contains_key_material(repr(row)), f"key material in PostgreSQL table {table}"
    finally:
        store.close()
