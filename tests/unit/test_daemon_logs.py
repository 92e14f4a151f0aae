"""Daemon logs: structured fields in text and JSON, and no key material, ever."""

from __future__ import annotations

import io
import json
import logging

from hypothesis import given
from hypothesis import strategies as st

from controller.daemon.logs import REDACTED, configure_logging, log_event, redact

KEY = "a2a_pro_0123456789abcdef01234567"


def capture(fmt: str, secrets: tuple[str, ...] = ()) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    return configure_logging(fmt, stream=stream, secrets=secrets), stream


def test_json_lines_carry_the_fields() -> None:
    log, stream = capture("json")
    log_event(log, logging.INFO, "reconcile finished", result="ok", planned=3, agents=["res-01"])
    doc = json.loads(stream.getvalue())
    assert doc["msg"] == "reconcile finished" and doc["level"] == "info"
    assert doc["result"] == "ok" and doc["planned"] == 3 and doc["agents"] == ["res-01"]
    assert doc["ts"].endswith("Z")


def test_text_lines_are_key_value_pairs() -> None:
    log, stream = capture("text")
    log_event(log, logging.WARNING, "agent failed", agent="res-01", error="gateway 403 forbidden", jobs=["a", "b"])
    line = stream.getvalue().strip()
    assert ' WARNING agent failed agent=res-01 error="gateway 403 forbidden" jobs=a,b' in line


def test_keys_secrets_and_url_credentials_never_reach_the_output() -> None:
    for fmt in ("text", "json"):
        log, stream = capture(fmt, secrets=("admin-secret-value",))
        log_event(log, logging.INFO, f"saw {KEY}", url="https://bot:ghp_tok3n@git.example.com/org/fleet.git")
        log_event(log, logging.INFO, "held", detail="admin-secret-value")
        try:
            raise RuntimeError(f"request failed with {KEY}")
        except RuntimeError:
            log.exception("crash")
        out = stream.getvalue()
        assert KEY not in out and "ghp_tok3n" not in out and "admin-secret-value" not in out
        assert "git.example.com/org/fleet.git" in out and REDACTED in out
        assert "Traceback" in out


@given(st.from_regex(r"a2a_(free|pro|enterprise|admin)_[0-9a-f]{24}", fullmatch=True), st.text(max_size=20))
def test_any_gateway_key_is_redacted_wherever_it_appears(key: str, around: str) -> None:
    assert key not in redact(f"{around}{key}{around}")


def test_keys_that_are_not_hex_are_redacted_too() -> None:
    out = redact("would not store a2a_custom_NOT-HEX-KEY-MATERIAL for x")
    assert "NOT-HEX" not in out and "KEY-MATERIAL" not in out
