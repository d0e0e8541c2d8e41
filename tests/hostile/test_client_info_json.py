"""Attack 4: hostile ClientInfo JSON, sealed correctly to the server's public key.

Anyone can seal any plaintext to the server's public key, so the JSON decoder faces the open
internet: nesting bombs, 200 KB strings full of control characters, invalid UTF-8, numbers with
thousands of digits, duplicate keys, wrong types, non-object roots. Each attempt is refused
with one short info line (or accepted, for JSON Go would accept), and what it costs in log is
bounded: client text appears escaped and clipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
import trio

from derpd.proto.frames import FrameReader, FrameType
from derpd.proto.keys import NodePrivate

from .conftest import (
    RAW_CONTROL,
    Derpd,
    assert_healthy,
    event_of,
    level_of,
    local_port,
    own_lines,
    read_to_eof,
    run_bounded,
    sealed_client_info,
    send_quietly,
    upgrade_to_client_info,
    wait_for_log,
)

pytestmark = pytest.mark.hostile

NASTY = 'A\x00\x1b[31m\r\n\u2028\u202e\x07"=\\ '  # NUL, ESC, CR, LF, LS, RLO, BEL, quote, equals, backslash


def _doc(**fields: object) -> bytes:
    return json.dumps(fields, ensure_ascii=False).encode()


def _app_name(json_bytes: int) -> str:
    """NASTY repeated until the ClientInfo JSON is ``json_bytes`` long (under the 256 KiB frame cap)."""
    per = len(_doc(AppName=NASTY * 100)) - len(_doc(AppName=""))
    return NASTY * (json_bytes * 100 // per)


APP_200K = _app_name(200_000)
MAX_LOG_PER_ATTEMPT = 1024  # bytes of log one hostile login may cost (all its lines together)


PAYLOADS: dict[str, bytes] = {
    "brackets_2000": b"[" * 2000 + b"]" * 2000,
    "brackets_100k_unclosed": b"[" * 100_000,
    "objects_2000": b'{"a":' * 2000 + b"1" + b"}" * 2000,
    "nested_in_appname": b'{"AppName":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "nested_in_unknown_field_65": b'{"x":' + b"[" * 65 + b"]" * 65 + b"}",
    "appname_200k_control_chars": _doc(version=2, CanAckPings=True, AppName=APP_200K),
    "appname_raw_control_chars": b'{"AppName":"a\x00\x1b[2J\rb"}',  # not JSON: control chars must be escaped
    "invalid_utf8_in_string": b'{"version":2,"AppName":"\xff\xfe\xc3\x28\xed\xa0\x80"}',
    "invalid_utf8_root": b"\xff" * 100,
    "lone_surrogate_escape": b'{"version":2,"AppName":"\\ud800\\udfff\\ud800"}',
    "version_1e999": b'{"version":1e999}',
    "version_minus_1e999": b'{"version":-1e999}',
    "version_5000_digits": b'{"version":' + b"1" * 5000 + b"}",
    "unknown_field_5000_digits": b'{"version":2,"x":' + b"9" * 5000 + b"}",
    "version_20_digits": b'{"version":99999999999999999999}',
    "version_fraction": b'{"version":1.5}',
    "version_negative": b'{"version":-1}',
    "version_nan": b'{"version":NaN}',
    "version_infinity": b'{"version":Infinity}',
    "duplicate_keys": b'{"version":1,"version":2,"AppName":"a","appname":"b","APPNAME":"c"}',
    "version_string": b'{"version":"2"}',
    "canackpings_number": b'{"CanAckPings":1}',
    "canackpings_string": b'{"CanAckPings":"true"}',
    "appname_number": b'{"AppName":123}',
    "appname_array": b'{"AppName":["a"]}',
    "meshkey_number": b'{"meshKey":5}',
    "meshkey_not_hex": b'{"meshKey":"' + b"zz" * 32 + b'"}',
    "meshkey_zero": b'{"meshKey":"' + b"00" * 32 + b'"}',
    "meshkey_wrong": b'{"meshKey":"' + b"ab" * 32 + b'"}',
    "meshkey_200k": b'{"meshKey":"' + b"a" * 200_000 + b'"}',
    "nulls": b'{"version":null,"AppName":null,"CanAckPings":null,"meshKey":null}',
    "root_array": b"[]",
    "root_string": b'"x"',
    "root_number": b"1",
    "root_null": b"null",
    "root_true": b"true",
    "empty": b"",
    "whitespace": b" \t\r\n " * 100,
    "bom_object": b"\xef\xbb\xbf{}",
    "trailing_garbage": b"{} x",
    "two_objects": b"{}{}",
    "10k_keys": b"{" + b",".join(b'"k%d":0' % i for i in range(10_000)) + b"}",
    "escape_in_key": b'{"\\u001b[31m\\u0000":1,"version":2}',
    "long_unknown_string": b'{"version":2,"x":"' + b"y" * 200_000 + b'"}',
}


@dataclass
class Attempt:
    name: str
    accepted: bool
    port: int


async def attempt(server: Derpd, name: str, plaintext: bytes) -> Attempt:
    stream, _ = await upgrade_to_client_info(server)
    port = local_port(stream)
    try:
        await send_quietly(stream, sealed_client_info(NodePrivate.generate(), server.public_key, plaintext))
        reader = FrameReader(max_frame_len=1 << 20)
        accepted = False
        with trio.move_on_after(5):
            while not accepted:
                data, closed = await read_to_eof(stream, 0.05)
                reader.feed(data)
                accepted = any(t == FrameType.SERVER_INFO for t, _ in reader.read_frames())
                if closed:
                    break
        return Attempt(name, accepted, port)
    finally:
        await trio.aclose_forcefully(stream)


async def _attempt_all(server: Derpd, rounds: int) -> list[Attempt]:
    jobs = [lambda n=n, p=p: attempt(server, n, p) for _ in range(rounds) for n, p in PAYLOADS.items()]
    return await run_bounded(jobs, 25)


async def test_hostile_client_info_json(server: Derpd) -> None:
    start = len(server.log())
    attempts = await _attempt_all(server, rounds=5)  # 225 sealed hostile logins
    assert len(attempts) >= 200
    await assert_healthy(server)  # also: no error line, no traceback, every line short and escaped
    growth = len(server.log()) - start
    assert growth < 200_000, f"{growth} bytes of log for {len(attempts)} hostile logins"
    too_chatty = {}
    for a in attempts:
        lines = server.lines_for(a.port, since=start)
        cost = sum(len(line.encode()) + 1 for line in lines)
        want = ["client_connected", "client_disconnected"] if a.accepted else ["handshake_failed"]
        events = sorted(event_of(line) for line in own_lines(lines))
        summaries = len(lines) - len(own_lines(lines))  # a sampled info line may name this attempt last
        levels = {level_of(line) for line in lines}
        if events != want or summaries > 1 or not levels <= {"debug", "info"} or cost > MAX_LOG_PER_ATTEMPT:
            too_chatty[a.name] = (cost, lines[:3])
    assert not too_chatty, too_chatty
    refused = {a.name for a in attempts if not a.accepted}
    must_refuse = {n for n in PAYLOADS if n.startswith(("root_", "brackets_", "objects_", "version_"))}
    must_refuse |= {"empty", "whitespace", "trailing_garbage", "two_objects", "appname_raw_control_chars"}
    must_refuse -= {"version_negative", "root_null"}  # Go takes an int, and null leaves the struct as it is
    assert must_refuse <= refused, sorted(must_refuse - refused)


async def test_bracket_bomb_is_one_clean_handshake_failure(server: Derpd) -> None:
    a = await attempt(server, "brackets_2000", PAYLOADS["brackets_2000"])
    assert not a.accepted
    await wait_for_log(server, rf" remote=127\.0\.0\.1:{a.port}(?!\d)")
    await trio.sleep(0.1)
    lines = server.lines_for(a.port)
    own = own_lines(lines)
    assert [event_of(x) for x in own] == ["handshake_failed"] and len(lines) <= 2, lines
    assert {level_of(x) for x in lines} <= {"debug", "info"}, lines
    assert all(len(x) < 400 for x in lines), lines
    await assert_healthy(server)


async def test_200k_appname_is_logged_escaped_and_clipped(server: Derpd) -> None:
    a = await attempt(server, "appname", PAYLOADS["appname_200k_control_chars"])
    assert a.accepted
    line = await wait_for_log(server, rf"event=client_connected .*remote=127\.0\.0\.1:{a.port}(?!\d)")
    assert not RAW_CONTROL.search(line), f"raw control characters from the AppName in the log: {line[:200]!r}"
    m = re.search(r' app=("(?:[^"\\]|\\.)*"|\S+)', line)
    assert m, line
    shown = m.group(1)
    assert "…[+" in shown, f"AppName not clipped: {len(shown)} chars"
    # 64 characters of it, each escaped to at most 6 (\u2028), plus quotes and the marker.
    assert len(shown) <= 64 * 6 + 20, f"{len(shown)} chars shown: {shown[:200]}"
    assert len(line.encode()) < 600, len(line)
    await assert_healthy(server)
