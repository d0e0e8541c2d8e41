"""derpd.tools.blockyaml against PyYAML and against itself.

* Round trip: generated documents (block mappings and sequences, nested, of ints, floats, bools,
  nulls and strings of any Unicode) written with blockyaml's scalar writers by the small emitter
  below, and DERP maps written by derpmap, read back to the same values, by blockyaml and by PyYAML.
* Differential: generated documents inside the reader's subset, with scalars written every way YAML
  allows there (plain numbers in every base and spelling, plain words, single- and double-quoted
  strings with every escape, comments, compact sequences, CRLF), read by blockyaml (each scalar
  resolved as yaml.v3 resolves an untyped one) and by PyYAML's ``safe_load``: the same Python values,
  except for the YAML 1.1 vs yaml.v3 differences listed in KNOWN_DIFFERENCES.
* Refusals: what yaml.v3 refuses, blockyaml refuses, naming the line.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, TypeAlias

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derpd.base.errors import ConfigurationError
from derpd.tools import blockyaml
from derpd.tools import derpmap as dm

yaml = pytest.importorskip("yaml", reason="PyYAML is the reference; install the test extras")

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- reading blockyaml's tree as yaml.v3 reads a document into interface{} -------------------------


def v3_scalar(text: str) -> Any:
    """An untyped plain scalar, in yaml.v3's order: null, bool, int, float, else the text."""
    if text in blockyaml.NULL_WORDS:
        return None
    for resolve in (blockyaml.resolve_bool, blockyaml.resolve_int, blockyaml.resolve_float):
        value = resolve(text)
        if value is not None:
            return value
    return text


def v3_values(node: blockyaml.Node | None, *, text_keys: bool = False) -> Any:
    """The tree as Python values. The tree keeps a key's text, not its style: keys are resolved as
    plain scalars (which the differential's keys are), or left as text with ``text_keys``."""
    if isinstance(node, blockyaml.MappingNode):
        return {(k if text_keys else v3_scalar(k)): v3_values(v, text_keys=text_keys) for k, v in node.items()}
    if isinstance(node, blockyaml.SequenceNode):
        return [v3_values(v, text_keys=text_keys) for v in node]
    if node is None:
        return None
    return v3_scalar(node.text) if node.plain else node.text


def norm(v: Any) -> Any:
    """A value with its type, so that 1, 1.0 and True differ, -0.0 is not 0.0 and NaN equals NaN."""
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, int):
        return ("int", v)
    if isinstance(v, float):
        return ("float", "nan" if math.isnan(v) else v.hex())
    if isinstance(v, str):
        return ("str", v)
    if v is None:
        return ("null",)
    if isinstance(v, dict):
        return ("map", tuple((norm(k), norm(x)) for k, x in v.items()))
    if isinstance(v, list):
        return ("seq", tuple(norm(x) for x in v))
    return (type(v).__name__, repr(v))


# --- the known differences between YAML 1.1 (PyYAML) and yaml.v3 ------------------------------------

# PyYAML's implicit resolvers (resolver.py) and yaml.v3's (resolve.go), transcribed only as far as
# the classes below need them.
PY11_INT = re.compile(r"[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+")
PY11_FLOAT = re.compile(r"[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?")
PY11_SEXAGESIMAL = re.compile(r"[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*")
PY11_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:[Tt]|[ \t]+)[0-9]{1,2}:[0-9]{2}:[0-9]{2}"
    r"(?:\.[0-9]*)?(?:[ \t]*(?:Z|[-+][0-9]{1,2}(?::[0-9]{2})?))?"
)
GO_INT = re.compile(r"[-+]?(?:0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*)")  # ParseInt(s, 0, 64)
V3_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")  # yamlStyleFloat


def _v3_number(t: str) -> bool:
    """yaml.v3 resolves ``t`` as an int or a float (within 64 bits)."""
    if t[:1] == ".":
        return bool(V3_FLOAT.fullmatch(t))  # handed to Go's ParseFloat as is: no underscores
    plain = t.replace("_", "")
    return t[:1] in tuple("+-0123456789") and bool(GO_INT.fullmatch(plain) or V3_FLOAT.fullmatch(plain))


def _py11_number(t: str) -> bool:
    return bool(PY11_INT.fullmatch(t) or PY11_FLOAT.fullmatch(t) or PY11_SEXAGESIMAL.fullmatch(t))


@dataclass(frozen=True)
class Difference:
    why: str
    matches: Callable[[str], bool]
    v3: type | tuple[type, ...]  # what yaml.v3 (and blockyaml) makes of such a plain scalar
    yaml11: type | tuple[type, ...]  # what PyYAML makes of it
    examples: tuple[str, ...]


KNOWN_DIFFERENCES = {
    # YAML 1.1's booleans. yaml.v3 takes them only when the target is a Go bool (blockyaml.as_bool,
    # which derpmap uses); untyped they are strings. (y/Y/n/N are strings to both: PyYAML leaves
    # them out.)
    "yaml11-bool": Difference(
        "yes/no/on/off are booleans to YAML 1.1, strings to yaml.v3",
        lambda t: t in {"yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF"},
        str,
        bool,
        ("yes", "No", "ON", "off"),
    ),
    # Base 60: "Base 60 floats are a bad idea, were dropped in YAML 1.2, and are purposefully
    # unsupported here" (resolve.go).
    "sexagesimal": Difference(
        "1:30 is 90 in base 60 to YAML 1.1, a string to yaml.v3",
        lambda t: bool(PY11_SEXAGESIMAL.fullmatch(t)),
        str,
        (int, float),
        ("1:30", "-1:30:00", "+2:05", "1:30.5", "1_0:00"),
    ),
    # yaml.v3 drops every underscore, then asks Go's strconv.ParseInt(s, 0, 64): it takes 0o, 0O,
    # 0X and 0B prefixes and an underscore anywhere; YAML 1.1 knows only 0b, 0x and 0-octal, with
    # underscores after the prefix. (017 is 15 to both: yaml.v3 keeps YAML 1.1's octal.)
    "go-int-syntax": Difference(
        "an int to yaml.v3 (Go's ParseInt syntax), a string to YAML 1.1",
        lambda t: (
            t[:1] in tuple("+-0123456789")
            and bool(GO_INT.fullmatch(t.replace("_", "")))
            and not PY11_INT.fullmatch(t)
            and not PY11_SEXAGESIMAL.fullmatch(t)
        ),
        int,
        str,
        ("0o17", "-0O17", "0X1F", "0B101", "-_1", "0_x1F", "+_0b1"),
    ),
    # yaml.v3's float syntax (yamlStyleFloat) wants neither a '.' nor a signed exponent; YAML 1.1's
    # wants both, and no sign before a leading '.'. A 0-prefixed decimal with an 8 or 9 is no octal
    # int, so yaml.v3 falls through to a float (0901 is 901.0), YAML 1.1 to a string.
    "v3-float-syntax": Difference(
        "a float to yaml.v3, a string to YAML 1.1",
        lambda t: (
            _v3_number(t)
            and not GO_INT.fullmatch(t.replace("_", ""))
            and not _py11_number(t)
            and not PY11_TIMESTAMP.fullmatch(t)
        ),
        float,
        str,
        ("1e5", "1E+5", "1.5e5", "2e-3", "-.5", "+.5e+1", "08", "0901", "-09.5e0", "1_e1", "1.0e+1_0"),
    ),
    # Text starting with '.' goes to Go's ParseFloat unchanged, which takes no underscores there.
    "dot-underscore": Difference(
        "a float to YAML 1.1, a string to yaml.v3",
        lambda t: t[:1] == "." and "_" in t and bool(PY11_FLOAT.fullmatch(t)),
        str,
        float,
        (".5_5", ".5_", ".0_1e+2"),
    ),
    # yaml.v3 keeps ints to 64 bits (int64, or uint64 without a sign, not even '+'); a decimal
    # beyond that is a float to it, a prefixed one a string. YAML 1.1 (Python) has big ints.
    "beyond-64-bits": Difference(
        "an exact int to YAML 1.1, a float or a string to yaml.v3",
        lambda t: (
            bool(PY11_INT.fullmatch(t))
            and GO_INT.fullmatch(t.replace("_", "")) is not None
            and not (-(2**63) <= _py11_int(t) < 2**63 or (t[:1] not in "+-" and 0 <= _py11_int(t) < 2**64))
        ),
        (float, str),
        int,
        ("18446744073709551616", "+9223372036854775808", "-9223372036854775809", "0x10000000000000000"),
    ),
    # yaml.v3 resolves timestamps too, but decoding into interface{} gives the text back "for
    # backward compatibility" (decode.go); PyYAML gives a date or datetime.
    "timestamp": Difference(
        "a date to YAML 1.1, a string to yaml.v3 (untyped)",
        lambda t: bool(PY11_TIMESTAMP.fullmatch(t)),
        str,
        (date, datetime),
        ("2001-12-14", "2001-12-14t21:59:43.10-05:00", "2001-12-14 21:59:43.10 -5"),
    ),
}
# Refused by PyYAML's safe_load ("could not determine a constructor"): YAML 1.1's value (=) and
# merge (<<) types, which yaml.v3 reads as the strings "=" and "<<" in a value.
PY11_REFUSES = ("=", "<<")


def _py11_int(t: str) -> int:
    v = t.replace("_", "")
    sign = -1 if v[:1] == "-" else 1
    v = v.lstrip("+-")
    if v[:2] in ("0b", "0x"):
        return sign * int(v[2:], {"b": 2, "x": 16}[v[1]])
    return sign * int(v, 8 if v[:1] == "0" and len(v) > 1 else 10)


def is_a(value: Any, types: type | tuple[type, ...]) -> bool:
    """``type(value)`` is one of ``types`` (exactly: True is no int here, a datetime no date)."""
    return type(value) in (types if isinstance(types, tuple) else (types,))


def _a_date(t: str) -> bool:
    try:
        yaml.safe_load(t)
    except ValueError:
        return False
    return True


def known_difference(text: str) -> str | None:
    found = [name for name, d in KNOWN_DIFFERENCES.items() if d.matches(text)]
    assert len(found) <= 1, (text, found)
    return found[0] if found else None


@pytest.mark.parametrize(("name", "text"), [(n, t) for n, d in KNOWN_DIFFERENCES.items() for t in d.examples], ids=str)
def test_each_known_difference_is_one(name: str, text: str) -> None:
    """Every listed example differs exactly as listed, and is classified as listed."""
    d = KNOWN_DIFFERENCES[name]
    assert known_difference(text) == name
    ours = v3_values(blockyaml.read(f"k: {text}\n"))["k"]
    theirs = yaml.safe_load(f"k: {text}\n")["k"]
    assert is_a(ours, d.v3) and is_a(theirs, d.yaml11), (ours, theirs)
    assert norm(ours) != norm(theirs)


@pytest.mark.parametrize("text", PY11_REFUSES)
def test_yaml11_value_and_merge_types(text: str) -> None:
    assert v3_values(blockyaml.read(f"k: {text}\n")) == {"k": text}
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load(f"k: {text}\n")


@pytest.mark.parametrize(
    ("text", "value"),
    [("017", 15), ("-017", -15), ("0_17", 15), ("00", 0), ("0x1F", 31), ("-0x_1f", -31), ("0b101", 5), ("1_000", 1000),
     ("+12", 12), ("-0", 0), ("y", "y"), ("N", "N"), ("1.5", 1.5), ("-0.", -0.0), (".5", 0.5), ("1_0.5_5", 10.55),
     ("1.0e+5", 1e5), (".inf", math.inf), ("-.Inf", -math.inf), ("+.INF", math.inf), (".NaN", math.nan),
     ("-.nan", "-.nan"), (".iNf", ".iNf"), ("~", None), ("Null", None), ("TRUE", True), ("tRUE", "tRUE"),
     ("0x", "0x"), ("0b2", "0b2"), ("0:30", "0:30"), ("._5", "._5"), ("_1", "_1"), ("9223372036854775807", 2**63 - 1),
     ("18446744073709551615", 2**64 - 1), ("-9223372036854775808", -(2**63))],
)  # fmt: skip
def test_what_both_agree_on(text: str, value: Any) -> None:
    """Look-alikes of the differences that are not: both read them the same."""
    assert known_difference(text) is None
    assert norm(v3_values(blockyaml.read(f"k: {text}\n"))["k"]) == norm(value)
    assert norm(yaml.safe_load(f"k: {text}\n")["k"]) == norm(value)


LOOKALIKES = st.one_of(
    st.text(alphabet="0123456789_+-.:eExXoObB", min_size=1, max_size=10),
    *(
        st.from_regex(pattern, fullmatch=True)
        for pattern in (
            r"[-+]?[0-9_]{1,5}(\.[0-9_]{0,3})?([eE][-+]?[0-9_]{1,2})?",  # decimal ints and floats
            r"[-+]?\.[0-9_]{1,4}([eE][-+]?[0-9]{1,2})?",  # a leading '.'
            r"[-+]?_?0_?[xXoObB]_?[0-9a-fA-F_]{1,6}",  # prefixed ints, underscores anywhere
            r"[-+]?[0-9]{1,20}",  # near and beyond 64 bits
            r"[-+]?[0-9_]{1,3}(:[0-9]{1,2}){1,2}(\.[0-9_]*)?",  # base 60
            r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}([Tt][0-9]{1,2}:[0-9]{2}:[0-9]{2}(\.[0-9]*)?(Z|[-+][0-9]{1,2})?)?",
        )
    ),
)


@given(st.lists(LOOKALIKES, min_size=1, max_size=20))
@FAST
def test_number_lookalikes_differ_only_as_listed(texts: list[str]) -> None:
    """Plain scalars made of the characters numbers are made of: blockyaml (as yaml.v3) and PyYAML
    agree on each, or it is one of the listed differences, with the types listed."""
    texts = [
        t
        for t in texts
        if t != "-"  # a list item, not a scalar
        and not t.endswith(":")  # a key
        and not re.fullmatch(r"[-+]?0[bx]_+", t)  # PyYAML crashes: int("", 2)
        and not (PY11_TIMESTAMP.fullmatch(t) and not _a_date(t))  # PyYAML crashes: "year 0 is out of range"
    ]
    doc = "".join(f"- {t}\n" for t in texts)
    for text, ours, theirs in zip(texts, v3_values(blockyaml.read(doc)) or [], yaml.safe_load(doc) or [], strict=True):
        name = known_difference(text)
        if name is None:
            assert norm(ours) == norm(theirs), text
        else:
            d = KNOWN_DIFFERENCES[name]
            assert is_a(ours, d.v3) and is_a(theirs, d.yaml11), (text, name, ours, theirs)


# --- generated documents ----------------------------------------------------------------------------

SAME: Any = object()


@dataclass(frozen=True)
class Leaf:
    text: str  # as written in the document
    value: Any  # what yaml.v3, and so blockyaml, makes of it
    yaml11: Any = SAME  # what PyYAML makes of it, when that differs (a KNOWN_DIFFERENCES example)


Tree: TypeAlias = "Leaf | dict[Leaf, Tree] | list[Tree]"

SPECIAL_WORDS = {
    *blockyaml.NULL_WORDS,
    *(w for d in ("true", "false", "yes", "no", "on", "off", "y", "n") for w in (d, d.title(), d.upper())),
}


def _underscored(draw: st.DrawFn, digits: str) -> str:
    """``digits`` with underscores after the first one, where both specs allow them."""
    spots = draw(st.sets(st.integers(1, len(digits)), max_size=2))
    return "".join(("_" if i in spots else "") + c for i, c in enumerate(digits)) + (
        "_" if len(digits) in spots else ""
    )


@st.composite
def ints(draw: st.DrawFn) -> Leaf:
    n = draw(st.integers(-(2**63), 2**64 - 1) | st.integers(-1000, 1000))
    base = draw(st.sampled_from(["dec", "dec", "oct", "hex", "bin"]))
    if n >= 2**63:
        base, sign = "dec", ""  # uint64: no sign (Go's ParseUint takes none)
    else:
        sign = "-" if n < 0 else draw(st.sampled_from(["", "+"]))
    m = abs(n)
    if base == "dec":
        body = _underscored(draw, str(m))
    elif base == "oct":
        body = "0" + _underscored(draw, f"{m:o}")
    else:
        prefix, digits = ("0x", f"{m:x}") if base == "hex" else ("0b", f"{m:b}")
        if base == "hex" and draw(st.booleans()):
            digits = digits.upper()
        body = prefix + _underscored(draw, digits).lstrip("_")
    return Leaf(sign + body, n)


@st.composite
def decimal_floats(draw: st.DrawFn) -> Leaf:
    """1.5, -0., +12.25e-3, .5E+2: forms both specs read as the same float."""
    exponent = draw(st.sampled_from(["", "e", "E"]))
    if exponent:
        exponent += draw(st.sampled_from("+-")) + str(draw(st.integers(0, 99)))
    fraction = draw(st.from_regex(r"[0-9]{0,6}", fullmatch=True))
    if draw(st.booleans()) and fraction:
        text = "." + fraction + exponent
    else:
        whole = draw(st.from_regex(r"[0-9]{1,6}", fullmatch=True))
        text = draw(st.sampled_from(["", "-", "+"])) + whole + "." + fraction + exponent
    return Leaf(text, float(text))


floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(lambda x: Leaf(blockyaml.write_float(x), x)),
    decimal_floats(),
    st.sampled_from([".inf", ".Inf", ".INF", "+.inf", "-.inf", "-.Inf", "-.INF"]).map(
        lambda t: Leaf(t, -math.inf if t[0] == "-" else math.inf)
    ),
    st.sampled_from([".nan", ".NaN", ".NAN"]).map(lambda t: Leaf(t, math.nan)),
)
specials = st.one_of(
    st.sampled_from(["~", "null", "Null", "NULL", ""]).map(lambda t: Leaf(t, None)),
    st.sampled_from(["true", "True", "TRUE", "false", "False", "FALSE"]).map(lambda t: Leaf(t, t[0] in "tT")),
    st.sampled_from(["y", "Y", "n", "N"]).map(lambda t: Leaf(t, t)),
)


def _plain_word_ok(t: str) -> bool:
    """A plain scalar both read as this string: starts with a letter, no ': ' or ' #', no tab."""
    return (
        t == t.strip(" ")
        and t not in SPECIAL_WORDS
        and ": " not in t
        and " #" not in t
        and not t.endswith(":")
        and all(c.isprintable() for c in t)
    )


plain_words = (
    st.text(
        st.characters(categories=("L", "N", "P", "S", "Zs"), exclude_characters="\t", max_codepoint=0x1FFFF),
        min_size=0,
        max_size=12,
    )
    .map(lambda t: "k" + t if not t[:1].isalpha() else t)
    .filter(_plain_word_ok)
    .map(lambda t: Leaf(t, t))
)

_NAMED = {"\0": "0", "\a": "a", "\b": "b", "\t": "t", "\n": "n", "\v": "v", "\f": "f", "\r": "r", "\x1b": "e"}
_NAMED |= {'"': '"', "\\": "\\", "/": "/", "\x85": "N", "\xa0": "_", "\u2028": "L", "\u2029": "P", " ": " "}
# Any character but a surrogate, and often the ones with escapes of their own or that must be escaped.
ANY_TEXT = st.text(
    st.characters(codec="utf-8") | st.sampled_from([*_NAMED, *"\ufeff\ufffe\uffff\x7f\u200d\U000e0001"]),
    max_size=16,
)


@st.composite
def escaped(draw: st.DrawFn, text: str) -> str:
    """``text`` double-quoted with escapes chosen at random: every character that must be escaped
    is, by any escape that YAML has for it; others are raw, or escaped too."""
    out = ['"']
    for c in text:
        must = c in '"\\' or not c.isprintable() or c in "\ufeff\ufffe\uffff"
        if not must and c != "\t" and draw(st.integers(0, 7)) != 0:
            out.append(c)
            continue
        if c == "\t" and not draw(st.booleans()):
            out.append(c)  # a raw tab is text inside quotes
            continue
        n = ord(c)
        forms = [f"\\U{n:08X}", f"\\U{n:08x}"]
        if n <= 0xFFFF:
            forms.append(f"\\u{n:04X}")
        if n <= 0xFF:
            forms.append(f"\\x{n:02x}")
        if c in _NAMED and draw(st.booleans()):
            forms = ["\\" + _NAMED[c]]
        out.append(draw(st.sampled_from(forms)))
    return "".join(out) + '"'


@st.composite
def quoted(draw: st.DrawFn, text_strategy: st.SearchStrategy[str] = ANY_TEXT) -> Leaf:
    text = draw(text_strategy)
    how = draw(st.sampled_from(["writer", "escaped", "escaped", "single"]))
    if how == "single" and all(c.isprintable() for c in text):
        return Leaf("'" + text.replace("'", "''") + "'", text)
    if how == "writer":
        return Leaf(blockyaml.write_str(text), text)
    return Leaf(draw(escaped(text)), text)


differences = st.sampled_from(
    [
        Leaf(t, v3_values(blockyaml.read(f"- {t}\n"))[0], yaml.safe_load(f"- {t}\n")[0])
        for d in KNOWN_DIFFERENCES.values()
        for t in d.examples
    ]
)
scalars = st.one_of(ints(), floats, specials, plain_words, quoted(), differences)

keys = st.one_of(
    st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
    .filter(lambda t: t not in SPECIAL_WORDS)
    .map(lambda t: Leaf(t, t)),
    st.integers(0, 99999).map(lambda n: Leaf(str(n), n)),
    # Quoted keys whose text, taken as plain, is still a string (the tree keeps a key's text only).
    quoted(st.text(st.characters(codec="utf-8"), max_size=8).map(lambda t: "k " + t)),
)


@st.composite
def documents(draw: st.DrawFn, depth: int = 4) -> dict[Leaf, Tree] | list[Tree]:
    """A block mapping or sequence of up to 5 entries, each a scalar or (a quarter of the time) a
    nested document; mapping keys are distinct as values, not only as text."""

    def entry() -> Tree:
        return draw(documents(depth - 1)) if depth > 1 and draw(st.integers(0, 3)) == 0 else draw(scalars)

    size = draw(st.integers(0, 5))
    if draw(st.booleans()):
        names = draw(st.lists(keys, min_size=size, max_size=size, unique_by=lambda k: norm(k.value)))
        return {name: entry() for name in names}
    return [entry() for _ in range(size)]


def expected(tree: Tree, yaml11: bool = False) -> Any:
    if isinstance(tree, Leaf):
        return tree.yaml11 if yaml11 and tree.yaml11 is not SAME else tree.value
    if isinstance(tree, dict):
        return {expected(k, yaml11): expected(v, yaml11) for k, v in tree.items()}
    return [expected(v, yaml11) for v in tree]


@dataclass(frozen=True)
class Layout:
    width: int  # indentation step
    compact: bool  # "key:" and then "- item" at the key's own column
    dash_inline: bool  # "- key: value" rather than "-" and the mapping on the lines below
    comment_every: int  # a trailing comment on every n-th line, and a comment line after it (0: none)
    start: str  # what comes before the first line: "", "---", a comment ...
    newline: str


layouts = st.builds(
    Layout,
    st.integers(1, 4),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0, 0, 1, 2, 3]),
    st.sampled_from(["", "---\n", "--- # a map\n", "# header\n\n", "\ufeff"]),
    st.sampled_from(["\n", "\r\n"]),
)


def emit(tree: Tree, lay: Layout) -> str:
    """``tree`` as a block-style document laid out as ``lay`` says."""

    def head(text: str, value: str) -> str:
        return f"{text} {value}" if value else text

    def block(node: dict[Leaf, Tree] | list[Tree], indent: int) -> list[str]:
        sp = " " * indent
        out: list[str] = []
        items = node.items() if isinstance(node, dict) else ((None, v) for v in node)
        for key, value in items:
            start = f"{sp}{key.text}:" if key is not None else f"{sp}-"
            if isinstance(value, Leaf):
                out.append(head(start, value.text))
            elif not value:
                out.append(head(start, "{}" if isinstance(value, dict) else "[]"))
            elif key is None and lay.dash_inline:
                inner = block(value, indent + 2)  # "- a: 1" / "- - x": the item's block starts after "- "
                out += [f"{sp}- {inner[0][indent + 2 :]}", *inner[1:]]
            else:
                out.append(start)
                out += block(
                    value, indent if key is not None and isinstance(value, list) and lay.compact else indent + lay.width
                )
        return out

    assert not isinstance(tree, Leaf)
    lines = block(tree, 0) or ["{}" if isinstance(tree, dict) else "[]"]
    if lay.comment_every:
        commented = []
        for i, line in enumerate(lines):
            if i % lay.comment_every == 0:
                commented += [f"{line}  # note {i}: a: b #", f"{' ' * (i % 3)}# comment line {i}", ""]
            else:
                commented.append(line)
        lines = commented
    return lay.start + lay.newline.join(lines) + lay.newline


@given(documents(), layouts)
@FAST
def test_blockyaml_and_pyyaml_read_generated_documents_alike(tree: Tree, lay: Layout) -> None:
    """The differential: both readers give the values the generator meant; they differ only where
    the leaf is a KNOWN_DIFFERENCES example."""
    text = emit(tree, lay)
    assert norm(v3_values(blockyaml.read(text))) == norm(expected(tree)), text
    assert norm(yaml.safe_load(text)) == norm(expected(tree, yaml11=True)), text


# --- round trips ------------------------------------------------------------------------------------

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=16),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(st.characters(codec="utf-8"), max_size=8) | st.integers(0, 999), children, max_size=4
        ).filter(lambda d: len({str(k) for k in d}) == len(d))
    ),  # 5 and "5" are one key to the tree
    max_leaves=20,
).filter(lambda v: isinstance(v, dict | list))


def write(value: Any) -> Tree:
    """A Python value as a tree of leaves written by blockyaml's writers (null, ints and bools as Go
    writes them)."""
    if isinstance(value, dict):
        return {Leaf(str(k) if isinstance(k, int) else blockyaml.write_str(k), k): write(v) for k, v in value.items()}
    if isinstance(value, list):
        return [write(v) for v in value]
    if value is None:
        return Leaf("null", None)
    if isinstance(value, bool):
        return Leaf(str(value).lower(), value)
    if isinstance(value, int):
        return Leaf(str(value), value)
    if isinstance(value, float):
        return Leaf(blockyaml.write_float(value), value)
    return Leaf(blockyaml.write_str(value), value)


def _text_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _text_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_text_keys(v) for v in value]
    return value


@given(values, layouts)
@FAST
def test_what_blockyaml_writes_reads_back(value: Any, lay: Layout) -> None:
    """Any nesting of any values, written with write_str/write_float (and read back by blockyaml and
    by PyYAML) is the same value: strings of any Unicode, escapes included, floats to the bit."""
    text = emit(write(value), lay)
    assert norm(v3_values(blockyaml.read(text), text_keys=True)) == norm(_text_keys(value)), text
    assert norm(yaml.safe_load(text)) == norm(value), text


region_ids = st.integers(1, 999)
derp_nodes = st.builds(
    dm.DerpNode,
    name=ANY_TEXT,
    region_id=region_ids,
    host_name=ANY_TEXT,
    cert_name=ANY_TEXT,
    ipv4=ANY_TEXT,
    ipv6=ANY_TEXT,
    stun_port=st.integers(-1, 65535),
    stun_only=st.booleans(),
    derp_port=st.integers(0, 65535),
    insecure_for_tests=st.booleans(),
    stun_test_ip=ANY_TEXT,
    can_port80=st.booleans(),
)
finite = st.floats(allow_nan=False, allow_infinity=False)
derp_regions = st.builds(
    dm.DerpRegion,
    region_id=region_ids,
    region_code=ANY_TEXT,
    region_name=ANY_TEXT,
    latitude=finite,
    longitude=finite,
    avoid=st.booleans(),
    no_measure_no_home=st.booleans(),
    nodes=st.lists(derp_nodes, max_size=3),
)
derp_maps = st.builds(
    dm.DerpMap,
    regions=st.dictionaries(region_ids, st.none() | derp_regions, max_size=3),
    omit_default_regions=st.booleans(),
    region_score=st.none() | st.dictionaries(region_ids, finite, max_size=3),
)


def _same_map(a: dm.DerpMap, b: dm.DerpMap) -> bool:
    """Field for field; scores to the bit. (Latitude -0.0 is omitted as zero, as Go's omitempty does.)"""

    def plain(m: dm.DerpMap) -> Any:
        regions = {
            k: None if r is None else {**vars(r), "nodes": [vars(n) for n in r.nodes]} for k, r in m.regions.items()
        }
        scores = None if m.region_score is None else {k: struct.pack("<d", v) for k, v in m.region_score.items()}
        return regions, m.omit_default_regions, scores

    return bool(plain(a) == plain(b))


@given(derp_maps)
@FAST
def test_derp_maps_written_by_derpd_read_back(m: dm.DerpMap) -> None:
    """derpmap's writer (the document) with blockyaml's (the scalars), read back by derpmap over
    blockyaml: the same map, every field, the checks' problems aside. PyYAML reads the same values."""
    text = dm.to_headscale_yaml(m)
    back, _ = dm.from_headscale_yaml(text)
    assert _same_map(back, m), text
    doc = yaml.safe_load(text)
    for rid, region in m.regions.items():
        if region is None:
            assert doc["regions"][rid] is None
            continue
        got = doc["regions"][rid]
        assert got["regioncode"] == region.region_code and got["regionname"] == region.region_name
        assert [n["hostname"] for n in got["nodes"]] == [n.host_name for n in region.nodes]
        assert [n["stunport"] for n in got["nodes"]] == [n.stun_port for n in region.nodes]


# --- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("a: 1\nk:\tv\n", 2, "a tab after ':'"),  # yaml.v3: "found character that cannot start any token"
        ("k:\t\n", 1, "a tab after ':'"),
        ("k: \t# c\n", 1, "a tab after ':'"),
        ("-\tv\n", 1, "a tab after '-'"),
        ("- k:\t\n", 1, "a tab after ':'"),
        ("k: - a\n", 1, "a list cannot start on this line"),  # "block sequence entries are not allowed"
        ("k: -\n", 1, "a list cannot start on this line"),
        ("--- x\n", 1, "nothing but a comment may follow '---'"),  # was read as an empty document
        ("k: 1\n...\nj: 2\n", 3, "only one YAML document"),  # yaml.v3 reads the first document only
        ("k: 1\n---\nj: 2\n", 2, "only one YAML document"),
        ("k: 1\nk: 2\n", 2, "appears twice"),  # yaml.v3: 'mapping key "k" already defined'
        ("  k: 1\n", 1, "column 1"),
        ("k:\n  a: 1\n   b: 2\n", 3, "unexpected indentation"),
        ("k: 'a\n", 1, "same line"),
        ('k: "\\uD800"\n', 1, "not a Unicode character"),
        ("k: a\x85b\n", 1, "raw character U+0085"),
        ("k: &a 1\n", 1, "anchors"),
        ("k: [1, 2]\n", 1, "flow collections"),
        ("k: |\n  x\n", 1, "block scalars"),
        ("- " * 40 + "x\n", 1, "nested deeper than 32"),
    ],
)
def test_refusals_name_the_line(text: str, line: int, words: str) -> None:
    with pytest.raises(blockyaml.YamlError, match=re.escape(words)) as e:
        blockyaml.read(text)
    assert e.value.line == line and str(e.value).startswith(f"line {line}: ")
    assert isinstance(e.value, ConfigurationError) and isinstance(e.value, ValueError)
    with pytest.raises(dm.DerpMapError, match=f"^line {line}: "):  # derpmap says the same, as its own error
        dm.from_headscale_yaml(text)


@pytest.mark.parametrize(
    "escape", [*(f"\\{e}" for e in _NAMED.values()), "\\x85", "\\u2028", "\\U0001F600", "\\u00e9", "\\U0010FFFF"]
)
def test_every_escape_reads_as_pyyaml_reads_it(escape: str) -> None:
    text = f'k: "a{escape}b"\n'
    assert v3_values(blockyaml.read(text)) == yaml.safe_load(text)


def test_tabs_where_yaml_v3_takes_them() -> None:
    """After a scalar (before a comment or ':') and inside quotes, a tab is white space or text."""
    assert v3_values(blockyaml.read("a\t: 1\nb: x\t# c\nc: 'q'\t\nd: \"t\tt\"\n")) == {
        "a": 1,
        "b": "x",
        "c": "q",
        "d": "t\tt",
    }


def test_empty_documents() -> None:
    for text in ("", "# only a comment\n", "---\n", "\ufeff\n\n", "...\n"):
        assert blockyaml.read(text) is None
        assert blockyaml.is_null(blockyaml.read(text))


def test_writers_refuse_what_no_reader_takes_back() -> None:
    with pytest.raises(blockyaml.YamlError, match="surrogate"):
        blockyaml.write_str("a\udc80")
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(blockyaml.YamlError, match="cannot write"):
            blockyaml.write_float(value)


def test_typed_fields_follow_yaml_v3_decode() -> None:
    """What derpmap uses: yaml.v3's rules for a Go bool, int and float64 field."""
    assert [blockyaml.as_bool(t) for t in ("yes", "Off", "y", "TRUE", "tRUE", "1")] == [
        True,
        False,
        True,
        True,
        None,
        None,
    ]
    assert [blockyaml.as_int(t) for t in ("901", "01605", "0901", "901.0", "901.5", "_901", "1e3", ".inf")] == [
        901, 901, 901, 901, None, None, 1000, None,
    ]  # fmt: skip
    assert blockyaml.as_int("+9223372036854775808") is None  # not an int64, and ParseUint takes no '+'
    assert blockyaml.as_int("18446744073709551615") == 2**64 - 1  # derpmap's checks bound it
    assert [blockyaml.as_float(t) for t in ("7", "0x10", ".5", "-1_000.5")] == [7.0, 16.0, 0.5, -1000.5]
    assert blockyaml.as_float("1e999") == math.inf and math.isnan(blockyaml.as_float(".nan") or 0.0)
