"""The daemon's logs: one event per line, as text for people or JSON for log pipelines.

Every line goes through redaction as its very last step, after the message, the fields and
any traceback are formatted, so nothing that reaches a handler can carry key material:
gateway keys (``a2a_…``), secrets the daemon was told about (the admin key it holds), and
credentials embedded in URLs (``https://user:token@host``, e.g. a git remote). Redaction is
the safety net; the code still logs fingerprints, never keys.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from policies.display import escape_controls
from policies.keyprint import redact_keys

LOGGER_NAME = "finops.daemon"
_FIELDS = "finops_fields"
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s\"']+@")
REDACTED = "[redacted]"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove key material (``policies.keyprint.redact_keys``: keys and their secret parts,
    the given secrets) and URL credentials from ``text``."""
    text = redact_keys(text, [s for s in secrets if s], REDACTED)
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)


def log_event(logger: logging.Logger, level: int, message: str, /, **fields: Any) -> None:
    """Log ``message`` with structured ``fields`` (JSON keys, or ``k=v`` pairs in text)."""
    logger.log(level, message, extra={_FIELDS: fields})


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    value = getattr(record, _FIELDS, None)
    return value if isinstance(value, Mapping) else {}


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _RedactingFormatter(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if s)

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.render(record), self._secrets)

    def render(self, record: logging.LogRecord) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def _exception(self, record: logging.LogRecord) -> str | None:
        if record.exc_info:
            return self.formatException(record.exc_info)
        return None


class JsonFormatter(_RedactingFormatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, then the fields."""

    def render(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            doc.setdefault(key, value)
        exc = self._exception(record)
        if exc:
            doc["exception"] = exc
        return json.dumps(doc, default=str, ensure_ascii=False)


def _text_value(value: Any) -> str:
    if isinstance(value, list | tuple | set | frozenset) and all(isinstance(v, str | int | float) for v in value):
        value = ",".join(str(v) for v in value)
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return json.dumps(text, ensure_ascii=False) if (not text or any(c in text for c in ' "=\n')) else text


class TextFormatter(_RedactingFormatter):
    """``2026-11-29T03:00:00.000Z INFO reconcile finished result=ok changes=0``."""

    def render(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.getMessage()]
        parts += [f"{k}={_text_value(v)}" for k, v in _fields(record).items()]
        line = escape_controls(" ".join(parts))  # a manifest snippet must not drive the terminal
        exc = self._exception(record)
        return f"{line}\n{exc}" if exc else line


def configure_logging(
    fmt: str = "text", *, stream: TextIO | None = None, secrets: Iterable[str] = (), level: int = logging.INFO
) -> logging.Logger:
    """Point the daemon's logger (and APScheduler's warnings) at ``stream`` (stderr)."""
    formatter: logging.Formatter = JsonFormatter(secrets) if fmt == "json" else TextFormatter(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    scheduler_log = logging.getLogger("apscheduler")
    for old in list(scheduler_log.handlers):
        scheduler_log.removeHandler(old)
    scheduler_log.addHandler(handler)
    scheduler_log.setLevel(logging.WARNING)
    scheduler_log.propagate = False
    return logger
