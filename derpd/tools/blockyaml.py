"""Block-style YAML, the subset DERP maps are written in, read and written as yaml.v3 reads it.

Headscale reads its ``derp.paths`` files with Go's yaml.v3; this module is derpd's side of that
format, so that no YAML library is needed at run time. Sans-IO and pure: text in, values out.

* :func:`read` turns a document into a tree of :class:`MappingNode`, :class:`SequenceNode` and
  :class:`ScalarNode` (each with its line, for messages). A scalar stays text with its style, as in
  a YAML parser's node graph, because yaml.v3 resolves a scalar by the Go type it fills:
* :func:`as_int`, :func:`as_float`, :func:`as_bool` and :func:`is_null` are those rules for a Go
  ``int``, ``float64``, ``bool`` field and a nil-able one; :func:`resolve_int`, :func:`resolve_float`
  and :func:`resolve_bool` are yaml.v3's tags for an untyped plain scalar (``resolve.go``).
* :func:`write_str` and :func:`write_float` write one scalar that yaml.v3, PyYAML and :func:`read`
  all take back as exactly that value. Which keys a document has, in which order and with which
  comments is the caller's business (``derpmap.to_headscale_yaml``).

The subset: block mappings and block sequences (``- key: value`` items, and ``key:`` followed by
``- item`` at the key's own column), single-line plain, single-quoted and double-quoted scalars with
every YAML escape, ``[]`` and ``{}``, comments, blank lines and one optional ``---``. Anything else
(flow collections, anchors, aliases, tags, block and multi-line scalars, directives, complex keys,
duplicate keys, tabs as indentation, raw characters yaml.v3 refuses) is a :class:`YamlError` naming
its line, never a guess.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TypeAlias

from derpd.base.errors import ConfigurationError

MAX_DEPTH = 32  # a DERP map nests 5 deep


class YamlError(ConfigurationError, ValueError):
    """A document (or a value to write) outside the subset; ``str()`` is ``line N: reason``.

    A :class:`~derpd.base.errors.ConfigurationError` like every file derpd cannot use, and a
    ValueError like the other parsers' errors. Not a ``DerpMapError``: that is defined above this module
    (derpmap imports it), which adds what the document was and re-raises its own error.
    """

    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(reason if line is None else f"line {line}: {reason}")
        self.reason = reason
        self.line = line


# --- the tree -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalarNode:
    text: str  # after quotes and escapes
    plain: bool  # unquoted: what it means comes from its text (as_int, resolve_int, ...)
    line: int


class MappingNode(dict[str, "Node"]):
    """A block mapping: keys as text (quotes and escapes applied), in document order."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.lines: dict[str, int] = {}  # the line of each key


class SequenceNode(list["Node"]):
    """A block sequence."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line


Node: TypeAlias = ScalarNode | MappingNode | SequenceNode


def read(text: str) -> Node | None:
    """The document in ``text`` as a tree; None when it holds nothing but comments and blank lines."""
    return _Reader(text).read()


# --- scalars as yaml.v3 resolves them ----------------------------------------------------------------

NULL_WORDS = frozenset({"", "~", "null", "Null", "NULL"})
_TRUE = frozenset({"true", "True", "TRUE"})
_FALSE = frozenset({"false", "False", "FALSE"})
# YAML 1.1's words, which yaml.v3 takes only when the target is a Go bool (decode.go).
_TRUE_11 = frozenset({"y", "Y", "yes", "Yes", "YES", "on", "On", "ON"})
_FALSE_11 = frozenset({"n", "N", "no", "No", "NO", "off", "Off", "OFF"})
_INF = {
    **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), math.inf),
    **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), -math.inf),
    **dict.fromkeys((".nan", ".NaN", ".NAN"), math.nan),
}
# yaml.v3's float syntax (resolve.go, yamlStyleFloat).
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_GO_INT = re.compile(r"([-+]?)(0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*)")
_INT64 = range(-(1 << 63), 1 << 63)


def is_null(node: Node | None) -> bool:
    """An empty document, or a plain ``null``, ``~`` or nothing at all: Go's zero value."""
    return node is None or (isinstance(node, ScalarNode) and node.plain and node.text in NULL_WORDS)


def resolve_bool(text: str) -> bool | None:
    """A plain scalar's ``!!bool``: YAML 1.2's ``true``/``false`` (three spellings each), else None."""
    return True if text in _TRUE else False if text in _FALSE else None


def resolve_int(text: str) -> int | None:
    """A plain scalar's ``!!int`` as yaml.v3 resolves it: underscores dropped, then Go's
    ``strconv.ParseInt(plain, 0, 64)`` (``0x``/``0o``/``0b`` prefixes, either case, and a bare
    leading 0 is octal: ``017`` is 15), then ``ParseUint`` for the rest of the uint64 range."""
    if not text[:1].isdigit() and text[:1] not in ("+", "-"):
        return None  # yaml.v3 resolves only scalars that start with a digit or a sign as numbers
    plain = text.replace("_", "")
    if len(plain) > 67:  # a sign, a prefix and 64 binary digits: anything longer overflows uint64
        return None
    m = _GO_INT.fullmatch(plain)
    if m is None:
        return None
    sign, digits = m.groups()
    base = {"x": 16, "o": 8, "b": 2}.get(digits[1:2].lower(), 8 if digits[0] == "0" else 10)
    body = digits[2:] if base in (16, 2) or digits[1:2] in ("o", "O") else digits
    n = int(body, base) if body else 0
    n = -n if sign == "-" else n
    if n in _INT64 or (not sign and n < 1 << 64):  # ParseUint takes no sign, not even "+"
        return n
    return None


def resolve_float(text: str) -> float | None:
    """A plain scalar's ``!!float`` as yaml.v3 resolves it (try :func:`resolve_int` first: ``7``
    matches both and is an int): ``.inf``, ``-.Inf``, ``.NaN`` ... in yaml.v3's spellings; text
    starting with ``.`` as Go's ParseFloat reads it (no underscores); text starting with a digit or
    a sign when ``yamlStyleFloat`` matches it with every underscore dropped. A literal too large for
    a float64 (``1e999``) is ±inf here; yaml.v3 keeps it a string; either way it is no usable number."""
    if text in _INF:
        return _INF[text]
    if text.startswith("."):
        plain = text
    elif text[:1].isdigit() or text[:1] in ("+", "-"):
        plain = text.replace("_", "")
    else:
        return None  # yaml.v3 resolves nothing else as a number (its resolveTable hints)
    return float(plain) if _FLOAT.fullmatch(plain) else None


def as_bool(text: str) -> bool | None:
    """A plain scalar decoded into a Go bool: :func:`resolve_bool`, or one of YAML 1.1's ``y``,
    ``yes``, ``on``, ``n``, ``no``, ``off`` (three spellings each), which yaml.v3 takes there."""
    value = resolve_bool(text)
    if value is None:
        value = True if text in _TRUE_11 else False if text in _FALSE_11 else None
    return value


def as_int(text: str) -> int | None:
    """A plain scalar decoded into a Go int: :func:`resolve_int`, or a float with an integral value
    in the int64 range (``901.0``, and ``0901``, which is no octal int but a float to yaml.v3).
    Stricter than yaml.v3, which would truncate ``1.5`` to 1."""
    n = resolve_int(text)
    if n is not None:
        return n
    f = resolve_float(text)
    if f is not None and math.isfinite(f) and f == int(f) and int(f) in _INT64:
        return int(f)
    return None


def as_float(text: str) -> float | None:
    """A plain scalar decoded into a Go float64: an int or a float as yaml.v3 resolves them. May be
    ±inf or NaN (``.inf``, ``1e999``), which the caller refuses if it has to."""
    n = resolve_int(text)
    return float(n) if n is not None else resolve_float(text)


# --- writing one scalar --------------------------------------------------------------------------

_SAFE_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
# Words YAML 1.1 or 1.2 resolvers read as booleans or null when unquoted.
_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}
# Escaped inside quotes: every character Python does not call printable (controls, separators,
# format characters, unassigned code points), and by name the ones some YAML reader takes wrongly
# when raw (all non-printable to Python as well): yaml.v3 refuses a raw C1 control, DEL or
# U+FFFE/U+FFFF in the file ("control characters are not allowed") and reads a raw NEL as a line
# break (a space inside quotes); NEL, U+2028 and U+2029 are line breaks to YAML 1.1 readers; a raw
# U+FEFF is a byte order mark to some. Written as \uXXXX, which yaml.v3, PyYAML and read() turn
# back into the same character.
_ESCAPED = frozenset("\x85\u2028\u2029\ufeff\ufffe\uffff")


def write_str(value: str) -> str:
    """A YAML scalar that yaml.v3, PyYAML and :func:`read` all take as exactly this string.

    Plain only when clearly a word (``derp.example.com``); anything else (IP addresses, names starting
    with a digit, ``yes``/``no``/``null``, colons, ``#``) is double-quoted. Inside the quotes ``\\``
    and ``"`` are backslash-escaped and every non-printable character (see ``_ESCAPED``) is a
    ``\\uXXXX`` (``\\UXXXXXXXX`` above U+FFFF) escape; printable characters, astral ones included,
    stay raw UTF-8. Not json.dumps: with ensure_ascii it writes astral characters as surrogate-pair
    escapes, which yaml.v3 refuses, and without it C1 controls, DEL and NEL stay raw. A lone surrogate
    cannot be written at all (:class:`YamlError`).
    """
    if _SAFE_PLAIN.fullmatch(value) and value.lower() not in _WORDS:
        return value
    out = ['"']
    for c in value:
        if c in '"\\':
            out.append("\\" + c)
        elif c in _ESCAPED or not c.isprintable():
            n = ord(c)
            if 0xD800 <= n <= 0xDFFF:
                raise YamlError(
                    f"{value!r} contains U+{n:04X}, half of a UTF-16 surrogate pair: not a character, and "
                    "Headscale's YAML reader (yaml.v3) refuses even its escape"
                )
            out.append(f"\\u{n:04X}" if n <= 0xFFFF else f"\\U{n:08X}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def write_float(value: float) -> str:
    """The shortest text that reads back as exactly ``value``, as a float, in yaml.v3 and YAML 1.1.

    Python's repr gives the shortest digits that round-trip (``1e-13``, ``0.1``, ``1.5e+16``); a
    mantissa without a point gets ``.0`` (``1.0e-13``), because YAML 1.1 readers such as PyYAML read
    ``1e-13`` as a string; the exponent keeps its sign and loses leading zeros (``1.5e-7``). NaN and
    the infinities are refused: yaml.v3 would read ``.nan`` and ``.inf``, but JSON, where a DERP
    map's numbers end up, has neither.
    """
    if not math.isfinite(value):
        raise YamlError(f"cannot write {value} in a DERP map: Headscale sends it to clients as JSON")
    mantissa, e, exponent = repr(float(value)).partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    if not e:
        return mantissa
    return f"{mantissa}e{exponent[0]}{exponent[1:].lstrip('0') or '0'}"


# --- the reader ------------------------------------------------------------------------------------


@dataclass
class _Line:
    no: int
    indent: int
    text: str  # without the indentation and the white space at the end
    tab_at_end: bool  # the white space cut from the end held a tab


# Characters a DERP map file may not hold raw: what yaml.v3's reader refuses ("control characters are
# not allowed": C0 but tab, DEL, C1 but NEL, U+FFFE, U+FFFF, surrogates), and NEL, U+2028 and
# U+2029, line breaks to yaml.v3 (NEL becomes a space inside quotes) but not to YAML 1.2.
_RAW_REFUSED = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff]")
_UNSUPPORTED = {
    "&": "anchors",
    "*": "aliases",
    "!": "tags",
    "|": "block scalars",
    ">": "folded scalars",
    "%": "directives",
    "@": "reserved indicators",
    "`": "reserved indicators",
    "?": "complex keys",
}
_ESCAPES = {
    "0": "\0",
    "a": "\a",
    "b": "\b",
    "t": "\t",
    "\t": "\t",
    "n": "\n",
    "v": "\v",
    "f": "\f",
    "r": "\r",
    "e": "\x1b",
    " ": " ",
    '"': '"',
    "/": "/",
    "\\": "\\",
    "N": "\x85",
    "_": "\xa0",
    "L": "\u2028",
    "P": "\u2029",
}


class _Reader:
    """Block mappings and sequences of single-line scalars: the shape of every DERP map file."""

    def __init__(self, text: str) -> None:
        self.lines: list[_Line] = []
        ended = False  # a "..." line was seen
        text = text.removeprefix("\ufeff")
        # YAML 1.2's line breaks only: str.splitlines() would also split at U+0085, U+2028, U+000C ...
        for no, raw in enumerate(re.split(r"\r\n|\r|\n", text), 1):
            bad = _RAW_REFUSED.search(raw)
            if bad:
                raise self.error(
                    no,
                    f"raw character U+{ord(bad.group()):04X}: YAML readers refuse it or take it as a line break; "
                    f"write it as \\u{ord(bad.group()):04X} inside double quotes",
                )
            body = raw.rstrip(" \t")
            stripped = body.lstrip(" ")
            if not stripped or stripped.startswith("#"):
                continue
            if stripped.startswith("\t") or (body[: len(body) - len(stripped)].count("\t")):
                raise self.error(no, "tabs cannot indent YAML; use spaces")
            if body.startswith("%"):
                raise self.error(no, "YAML directives are not supported in a DERP map")
            marker = re.match(r"(---|\.\.\.)(?:[ \t]+|$)", body)
            if marker:
                kind, after = marker.group(1), body[marker.end() :]
                if after and not after.startswith("#"):
                    raise self.error(no, f"nothing but a comment may follow {kind!r} on its line")
                if kind == "---" and (self.lines or ended):
                    raise self.error(no, "only one YAML document is allowed")
                ended = ended or kind == "..."
                continue
            if ended:  # yaml.v3 reads the first document only: what follows would be ignored
                raise self.error(no, "only one YAML document is allowed (this follows '...')")
            self.lines.append(_Line(no, len(body) - len(stripped), stripped, "\t" in raw[len(body) :]))
        self.i = 0
        self.depth = 0

    @staticmethod
    def error(line: int, msg: str) -> YamlError:
        return YamlError(msg, line)

    def peek(self) -> _Line | None:
        return self.lines[self.i] if self.i < len(self.lines) else None

    def read(self) -> Node | None:
        first = self.peek()
        if first is None:
            return None
        if first.indent:
            raise self.error(first.no, "the document must start at column 1")
        value = self.block(0)
        extra = self.peek()
        if extra is not None:
            raise self.error(extra.no, "unexpected indentation")
        return value

    @staticmethod
    def _is_item(text: str) -> bool:
        return text == "-" or text.startswith(("- ", "-\t"))

    def block(self, indent: int) -> Node:
        line = self.peek()
        assert line is not None and line.indent == indent
        self.depth += 1
        try:
            return self._block(line, indent)
        finally:
            self.depth -= 1

    def _block(self, line: _Line, indent: int) -> Node:
        if self.depth > MAX_DEPTH:  # a DERP map nests 5 deep; "- " x 500 must not recurse 500 times
            raise self.error(line.no, f"nested deeper than {MAX_DEPTH} levels")
        if self._is_item(line.text):
            return self.sequence(indent)
        if self._split_key(line) is not None:
            return self.mapping(indent)
        self.i += 1
        value = self.inline(line.text, line.no)
        nxt = self.peek()
        if nxt is not None and nxt.indent > indent:
            raise self.error(nxt.no, "multi-line scalars are not supported; write the value on one line")
        return value

    def sequence(self, indent: int) -> SequenceNode:
        first = self.peek()
        assert first is not None
        items = SequenceNode(first.no)
        while (line := self.peek()) is not None and line.indent == indent and self._is_item(line.text):
            rest = line.text[1:]
            self._no_tab_after("-", rest, line)
            stripped = rest.lstrip(" ")
            if not stripped or stripped.startswith("#"):
                self.i += 1
                nxt = self.peek()
                if nxt is not None and nxt.indent > indent:
                    items.append(self.block(nxt.indent))
                else:
                    items.append(ScalarNode("", True, line.no))
                continue
            # "- key: value": the item is a block starting at the column after the dash.
            self.lines[self.i] = _Line(line.no, indent + 1 + len(rest) - len(stripped), stripped, line.tab_at_end)
            items.append(self.block(self.lines[self.i].indent))
        line = self.peek()
        if line is not None and line.indent > indent:
            raise self.error(line.no, "unexpected indentation")
        return items

    def mapping(self, indent: int) -> MappingNode:
        first = self.peek()
        assert first is not None
        result = MappingNode(first.no)
        while (line := self.peek()) is not None and line.indent == indent:
            split = self._split_key(line)
            if split is None:
                what = "a '- ' item" if self._is_item(line.text) else f"{line.text!r}"
                raise self.error(line.no, f"expected 'key: value' in this mapping, got {what}")
            key, rest = split
            self._no_tab_after(":", rest, line)
            if key in result:
                raise self.error(line.no, f"key {key!r} appears twice in one mapping")
            self.i += 1
            if rest.strip(" \t") and not rest.strip(" \t").startswith("#"):
                value = self.inline(rest.strip(" \t"), line.no)
            else:
                nxt = self.peek()
                if nxt is not None and nxt.indent > indent:
                    value = self.block(nxt.indent)
                elif nxt is not None and nxt.indent == indent and self._is_item(nxt.text):
                    value = self.sequence(indent)  # "nodes:" then "- ..." at the same column
                else:
                    value = ScalarNode("", True, line.no)
            result[key] = value
            result.lines[key] = line.no
        line = self.peek()
        if line is not None and line.indent > indent:
            raise self.error(line.no, "unexpected indentation")
        return result

    def _no_tab_after(self, indicator: str, rest: str, line: _Line) -> None:
        """yaml.v3 (libyaml) skips no tab after a ':' or '-' indicator, even before a comment or the
        end of the line ("found character that cannot start any token")."""
        after = rest.lstrip(" ")
        if after.startswith("\t") or (not after and line.tab_at_end):
            raise self.error(line.no, f"a tab after {indicator!r}: YAML readers refuse it; use spaces")

    def _split_key(self, line: _Line) -> tuple[str, str] | None:
        """(key, rest) when the line is ``key: ...``; None for a bare scalar."""
        text = line.text
        if text[0] in "\"'":
            scalar, end = self._quoted(text, line.no)
            after = text[end:].lstrip(" ")
            if after == ":" or after.startswith((": ", ":\t")):
                return scalar.text, after[1:]
            return None
        if text[0] in "[{" or text[0] in _UNSUPPORTED:
            return None
        for i, c in enumerate(text):
            if c == "#" and i and text[i - 1] in " \t":
                return None
            if c == ":" and (i + 1 == len(text) or text[i + 1] in " \t"):
                return text[:i].rstrip(" \t"), text[i + 1 :]
        return None

    def inline(self, text: str, no: int) -> Node:
        """A value written on the key's (or dash's) line."""
        c = text[0]
        if c in "\"'":
            scalar, end = self._quoted(text, no)
            rest = text[end:].strip(" \t")
            if rest and not rest.startswith("#"):
                raise self.error(no, f"unexpected {rest!r} after a quoted string")
            return scalar
        if c in "[{":
            body = text.split(" #", 1)[0].strip(" \t")
            if re.fullmatch(r"\[\s*\]", body):
                return SequenceNode(no)
            if re.fullmatch(r"\{\s*\}", body):
                return MappingNode(no)
            raise self.error(no, "flow collections ([a, b] / {a: b}) are not supported; use block style")
        if c in _UNSUPPORTED:
            raise self.error(no, f"YAML {_UNSUPPORTED[c]} are not supported in a DERP map")
        if self._is_item(text):
            raise self.error(no, "a list cannot start on this line; put its '- ' items on the lines below")
        value = re.split(r"[ \t]#", text, maxsplit=1)[0].rstrip(" \t")
        if re.search(r":[ \t]", value) or value.endswith(":"):
            raise self.error(no, f"a mapping cannot start on this line ({value!r}); put it on its own lines")
        return ScalarNode(value, True, no)

    def _quoted(self, text: str, no: int) -> tuple[ScalarNode, int]:
        quote = text[0]
        out: list[str] = []
        i = 1
        while i < len(text):
            c = text[i]
            if quote == "'":
                if c == "'":
                    if text[i + 1 : i + 2] == "'":
                        out.append("'")
                        i += 2
                        continue
                    return ScalarNode("".join(out), False, no), i + 1
                out.append(c)
                i += 1
                continue
            if c == '"':
                return ScalarNode("".join(out), False, no), i + 1
            if c == "\\":
                esc = text[i + 1 : i + 2]
                if esc in _ESCAPES:
                    out.append(_ESCAPES[esc])
                    i += 2
                    continue
                width = {"x": 2, "u": 4, "U": 8}.get(esc)
                digits = text[i + 2 : i + 2 + width] if width else ""
                if not width or not re.fullmatch(r"[0-9A-Fa-f]+", digits) or len(digits) != width:
                    raise self.error(no, f"bad escape \\{esc} in a double-quoted string")
                code = int(digits, 16)
                if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
                    # yaml.v3: "found invalid Unicode character escape code" (a surrogate pair too)
                    raise self.error(no, f"escape \\{esc}{digits} is not a Unicode character; Headscale refuses it")
                out.append(chr(code))
                i += 2 + width
                continue
            out.append(c)
            i += 1
        raise self.error(no, "quoted strings must end on the same line")
