"""JSON from outside, decoded the way Go's ``encoding/json`` fills a struct, and bounded. Sans I/O.

Every JSON document derpd reads from someone else goes through here: the sealed ClientInfo (anyone
can seal one to the public server key), the admission webhook's answer, the rate config and the key
file. Python's ``json`` alone is not enough for that:

* **Depth.** ``[`` × 2000 makes the C scanner raise ``RecursionError``. ``parse`` counts nesting
  before decoding and refuses anything deeper than ``MAX_DEPTH`` with a ``GoJSONError``.
* **Size.** A caller passes ``max_size``; longer input is refused before any work.
* **Go's rules.** Field names match exactly first, then case-insensitively (Go's simple folding,
  so ``ſ`` matches ``s``); a name given twice takes the last value; ``null`` leaves a field as it
  is; unknown fields are skipped whatever they hold (a 5,000-digit number included); a wrong type
  is an error; invalid UTF-8 in strings becomes U+FFFD; ``NaN``/``Infinity`` are not JSON.

``parse`` returns plain values with objects as ``Pairs`` (every (name, value) in order, duplicates
kept); ``fill`` maps such an object onto a field spec. ``decode`` does both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

MAX_DEPTH = 64  # Go allows 10,000; nothing derpd reads nests more than 2 deep
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class GoJSONError(ValueError):
    """The input is not JSON derpd accepts; the message is short and never echoes the input."""


class Pairs(list[tuple[str, Any]]):
    """A JSON object as its (name, value) pairs, in order, duplicates included."""


class Number(str):
    """A JSON number kept as its text, so that a field decides what it may be (as Go does)."""

    __slots__ = ()


def _reject_constant(name: str) -> Any:
    raise GoJSONError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(
    object_pairs_hook=Pairs, parse_int=Number, parse_float=Number, parse_constant=_reject_constant
)
# Strings removed before counting brackets; the unrolled form never backtracks.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")
_WS = " \t\r\n"


def nesting_depth(text: str) -> int:
    """How deeply arrays and objects nest in ``text`` (0 for a scalar), ignoring brackets in strings.

    Malformed input gets some number; the decoder reports the real problem afterwards.
    """
    if text.count("[") + text.count("{") == 0:
        return 0
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse(
    data: bytes | str,
    *,
    max_size: int | None = None,
    max_depth: int = MAX_DEPTH,
    first_value_only: bool = False,
) -> Any:
    """One JSON value from ``data``.

    ``first_value_only`` reads like Go's ``json.Decoder.Decode`` (whatever follows the first value is
    ignored); otherwise like ``json.Unmarshal`` (only whitespace may follow).
    """
    if max_size is not None and len(data) > max_size:
        raise GoJSONError(f"longer than {max_size} bytes")
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes | bytearray) else data
    if text.startswith("\ufeff"):
        raise GoJSONError("starts with a byte order mark")
    if text.count("[") + text.count("{") > max_depth and nesting_depth(text) > max_depth:
        raise GoJSONError(f"nested deeper than {max_depth}")
    start = len(text) - len(text.lstrip(_WS))
    try:
        value, end = _DECODER.raw_decode(text, start)
    except GoJSONError:
        raise
    except (ValueError, RecursionError) as e:  # RecursionError: unreachable after the depth check
        where = f" at offset {e.pos}" if isinstance(e, json.JSONDecodeError) else ""
        raise GoJSONError(f"malformed JSON{where}") from None
    if not first_value_only and text[end:].strip(_WS):
        raise GoJSONError(f"unexpected data after the JSON value at offset {end}")
    return value


# --- Go's struct filling --------------------------------------------------------------------


def fold(name: str) -> str:
    """Go's ``foldName``: ASCII upper-cased; every other rune replaced by the smallest rune of its
    simple case-folding orbit (so ``ſ`` → ``S`` and the Kelvin sign → ``K``)."""
    if name.isascii():
        return name.upper()
    return "".join(map(_fold_rune, name))


def _fold_rune(c: str) -> str:
    if c.isascii():
        return c.upper()
    orbit = {c, c.lower(), c.upper(), c.lower().upper(), c.upper().lower()}
    return min(x for x in orbit if len(x) == 1)


def _int64(value: Any) -> int | None:
    if type(value) is not Number:
        return None
    try:
        n = int(value)  # "1.0" and "1e3" are not integers to Go
    except ValueError:
        return None
    return n if INT64_MIN <= n <= INT64_MAX else None


def _convert(value: Any, kind: type) -> Any:
    """``value`` as a Go field of ``kind`` (str, bool, int = int64, float), or raise ValueError."""
    if kind is str and isinstance(value, str) and type(value) is not Number:
        return str(value)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int:
        n = _int64(value)
        if n is not None:
            return n
    if kind is float and type(value) is Number:
        f = float(value)
        if f not in (float("inf"), float("-inf")):
            return f
    raise ValueError(kind.__name__)


_GO_KIND = {str: "a string", bool: "a bool", int: "an integer", float: "a number"}


def fill(doc: Any, fields: Mapping[str, type], what: str) -> dict[str, Any]:
    """The fields ``doc`` sets, as Go fills a struct whose JSON names and kinds are ``fields``.

    ``doc`` is what ``parse`` returned; ``None`` (JSON ``null``) sets nothing. Returns only the
    fields present, by their spec name.
    """
    if doc is None:
        return {}
    if not isinstance(doc, Pairs):
        raise GoJSONError(f"{what}: JSON is not an object")
    folded = {fold(name): name for name in fields}
    out: dict[str, Any] = {}
    for key, value in doc:
        name = key if key in fields else folded.get(fold(key))
        if name is None or value is None:
            continue
        try:
            out[name] = _convert(value, fields[name])
        except ValueError:
            raise GoJSONError(f"{what}: field {name} must be {_GO_KIND[fields[name]]}") from None
    return out


def decode(
    data: bytes | str,
    fields: Mapping[str, type],
    what: str,
    *,
    max_size: int | None = None,
    first_value_only: bool = False,
) -> dict[str, Any]:
    """``parse`` then ``fill``: a JSON object from outside as the fields it sets."""
    try:
        doc = parse(data, max_size=max_size, first_value_only=first_value_only)
    except GoJSONError as e:
        raise GoJSONError(f"{what}: {e}") from None
    return fill(doc, fields, what)


def to_python(value: Any) -> Any:
    """A parsed value as plain Python (dicts with the last duplicate winning, ints and floats)."""
    if isinstance(value, Pairs):
        return {k: to_python(v) for k, v in value}
    if isinstance(value, list):
        return [to_python(v) for v in value]
    if type(value) is Number:
        n = _int64(value)
        return n if n is not None else float(value)
    return value
