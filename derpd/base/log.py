"""One line per event, ``key=value``, to stderr (journald adds its own metadata).

Call sites pass an event name and fields; nothing secret (private keys, mesh key)
is ever a field. Values with spaces, quotes or ``=`` are quoted.

Every value is escaped (``derpd.base.text.escape``: non-printable characters as ``\\xNN``) in both
formats, so no byte a client sent can end a line, hide text or drive a terminal. A value
marked ``text.Peer`` (a string the client chose) is clipped to 64 characters, any other to
1,024, with a marker saying how much was cut: one hostile login is one short line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from derpd.base.text import PEER_TEXT_LIMIT, VALUE_LIMIT, Peer, clip

LOGGER_NAME = "derpd"
log = logging.getLogger(LOGGER_NAME)


_NEEDS_QUOTES = re.compile(r'[\s"=]')
EXC_LIMIT = 16 * 1024  # a folded traceback (only ever from a bug, never from input)


def _clean(value: Any, limit: int = VALUE_LIMIT) -> str:
    """The value as shown: escaped, and clipped to 64 (client text) or ``limit`` characters."""
    text = str(value)
    return clip(text, PEER_TEXT_LIMIT if isinstance(value, Peer) else limit)


def _quote(value: Any, limit: int = VALUE_LIMIT) -> str:
    text = _clean(value, limit)
    if text == "" or _NEEDS_QUOTES.search(text):
        text = '"' + text.replace('"', '\\"') + '"'
    return text


def format_fields(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        head = f"ts={ts} level={record.levelname.lower()} event={_quote(record.getMessage())}"
        fields = getattr(record, "fields", None)
        line = f"{head} {format_fields(fields)}" if fields else head
        if record.exc_info:
            line += " exc=" + _quote(self.formatException(record.exc_info), EXC_LIMIT)
        return line


_context: dict[str, Any] = {}  # fields every line of this process carries (e.g. worker=2)


def set_context(**fields: Any) -> None:
    _context.update(fields)


def event(level: int, name: str, **fields: Any) -> None:
    """Log one event; cheap when the level is disabled."""
    if log.isEnabledFor(level):
        log.log(level, name, extra={"fields": {**_context, **fields} if _context else fields})


def info(name: str, **fields: Any) -> None:
    event(logging.INFO, name, **fields)


def warning(name: str, **fields: Any) -> None:
    event(logging.WARNING, name, **fields)


def debug(name: str, **fields: Any) -> None:
    event(logging.DEBUG, name, **fields)


def error(name: str, **fields: Any) -> None:
    event(logging.ERROR, name, **fields)


class Sampled:
    """A recurring event (a flood of garbage, refused connections): every occurrence at
    debug, and at most one info line per ``every`` seconds with how many there were."""

    def __init__(self, name: str, every: float = 60.0) -> None:
        self.name = name
        self.every = every
        self.count = 0
        self.next_at = float("-inf")

    def note(self, **fields: Any) -> None:
        debug(self.name, **fields)
        self.count += 1
        now = time.monotonic()
        if now >= self.next_at and log.isEnabledFor(logging.INFO):
            info(self.name, count=self.count, **{f"last_{k}": v for k, v in fields.items()})
            self.count = 0
            self.next_at = now + self.every


def exception(name: str, **fields: Any) -> None:
    """An unexpected error, with its traceback folded into the same line."""
    log.error(name, exc_info=True, extra={"fields": {**_context, **fields}})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        for k, v in (getattr(record, "fields", None) or {}).items():
            if v is not None and k not in doc:
                doc[k] = v if isinstance(v, int | float | bool) else _clean(v)
        if record.exc_info:
            doc["exc"] = _clean(self.formatException(record.exc_info), EXC_LIMIT)
        return json.dumps(doc, separators=(",", ":"))


def setup(level: str = "info", stream: Any = None, *, json_lines: bool = False) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else KeyValueFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
