"""Client text in log lines: escaped and clipped (derpd.base.text and both derpd.base.log formats)."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from derpd.base import log
from derpd.base.text import PEER_TEXT_LIMIT, VALUE_LIMIT, Peer, clip, escape


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("derp.example.com", "derp.example.com"),
        ("tailscaled ünïcode 🙂", "tailscaled ünïcode 🙂"),  # printable text stays as it is
        ("a\x00b\x1b[31mc\rd\ne\tf", "a\\x00b\\x1b[31mc\\rd\\ne\\tf"),
        ("back\\slash", "back\\\\slash"),  # so an escape in the output is always ours
        ("\x7f\x85\u2028\u2029\u202e\ufeff", "\\x7f\\x85\\u2028\\u2029\\u202e\\ufeff"),
        ("\ud800", "\\ud800"),
        ("\U000e0001", "\\U000e0001"),
    ],
)
def test_escape(raw: str, shown: str) -> None:
    assert escape(raw) == shown


def test_clip_marks_what_it_cut() -> None:
    assert clip("x" * 64) == "x" * 64
    assert clip("x" * 200_000) == "x" * 64 + "…[+199936]"
    assert clip("\x00" * 100, 4) == "\\x00" * 4 + "…[+96]"


_ESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|[nrt\\])")
_SHORT = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}


def _unescape(shown: str) -> str:
    return _ESCAPE.sub(lambda m: _SHORT.get(m[1]) or chr(int(m[1][1:], 16)), shown)


@given(st.text())
def test_escaped_text_is_printable_and_reversible(raw: str) -> None:
    shown = escape(raw)
    assert shown.isprintable()
    assert _unescape(shown) == raw


@pytest.fixture(params=["text", "json"])
def log_lines(request: pytest.FixtureRequest) -> Iterator[tuple[str, io.StringIO]]:
    stream = io.StringIO()
    log.setup("debug", stream, json_lines=request.param == "json")
    yield request.param, stream
    log.setup("info")


def _app_name_of(fmt: str, line: str) -> str:
    if fmt == "json":
        return str(json.loads(line)["app"])
    value = line.split(" app=", 1)[1]
    return value[1 : value.rindex('"')] if value.startswith('"') else value.split(" ")[0]


def test_a_hostile_app_name_is_one_short_escaped_line(log_lines: tuple[str, io.StringIO]) -> None:
    fmt, stream = log_lines
    hostile = "evil\x00\x1b[2J\r\nts=forged level=error\u2028" + "A" * 200_000
    log.info("client_connected", app=Peer(hostile), remote="127.0.0.1:5")
    out = stream.getvalue()
    assert out.count("\n") == 1 and len(out) < 400
    assert not any(c in out for c in "\x00\x1b\r\u2028")
    assert _app_name_of(fmt, out.rstrip("\n")) == clip(hostile)
    assert _app_name_of(fmt, out.rstrip("\n")).endswith("…[+199969]")


def test_every_value_is_escaped_and_bounded(log_lines: tuple[str, io.StringIO]) -> None:
    fmt, stream = log_lines
    log.warning("handshake_failed", reason="bad \x1b thing " + "r" * 5000, n=3, ok=True)
    line = stream.getvalue()
    assert "\x1b" not in line and len(line) < VALUE_LIMIT + 200
    if fmt == "json":
        doc = json.loads(line)
        assert doc["n"] == 3 and doc["ok"] is True and doc["reason"].startswith("bad \\x1b thing")
    else:
        assert ' reason="bad \\x1b thing ' in line and " n=3 " in line


def test_tracebacks_stay_whole_but_on_one_line(log_lines: tuple[str, io.StringIO]) -> None:
    _, stream = log_lines
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("internal_error", remote="-")
    out = stream.getvalue()
    assert out.count("\n") == 1 and "RuntimeError: boom" in out and "Traceback" in out


def test_sampled_lines_keep_the_peer_marking(log_lines: tuple[str, io.StringIO]) -> None:
    _, stream = log_lines
    log.log.setLevel(logging.INFO)
    log.Sampled("garbage", 60.0).note(what=Peer("\x00" * 1000))
    out = stream.getvalue()
    assert out.count("\n") == 1 and len(out) < 64 * 4 + 200 and "\\x00" in out


def test_limits_are_what_the_readme_says() -> None:
    assert (PEER_TEXT_LIMIT, VALUE_LIMIT) == (64, 1024)
