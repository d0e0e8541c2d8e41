"""derpd.proto.gojson: Go's encoding/json rules for structs, with depth and size bounds."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from derpd.proto import gojson
from derpd.proto.gojson import GoJSONError, Pairs, decode, fill, fold, nesting_depth, parse

FIELDS = {"Name": str, "Count": int, "On": bool, "Ratio": float}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b'{"Name":"a","Count":3,"On":true,"Ratio":0.5}', {"Name": "a", "Count": 3, "On": True, "Ratio": 0.5}),
        (b'{"name":"a","COUNT":3}', {"Name": "a", "Count": 3}),  # names fold
        (b'{"Name":"a","name":"b"}', {"Name": "b"}),  # the last of a name wins, exact or folded
        (b'{"name":"b","Name":"a"}', {"Name": "a"}),
        (b'{"Count":1,"Count":null}', {"Count": 1}),  # null leaves a field as it is
        (b'{"Other":[1,{"x":[true]}],"Big":' + b"9" * 5000 + b"}", {}),  # unknown fields: any value
        (b"null", {}),
        (b" \n\t{}\r\n", {}),
        (b'{"Count":-9223372036854775808}', {"Count": -(1 << 63)}),
        (b'{"Ratio":1e300,"Count":0}', {"Ratio": 1e300, "Count": 0}),
        ('{"N\u0430me":"cyrillic a is another name"}'.encode(), {}),
        ('{"\u212aey":1}'.encode(), {}),
        (b'{"Name":"\xff\xfe"}', {"Name": "\ufffd\ufffd"}),  # Go replaces invalid UTF-8
    ],
)
def test_fills_like_go(text: bytes, expected: dict[str, object]) -> None:
    assert decode(text, FIELDS, "test") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"", "malformed JSON"),
        (b"{", "malformed JSON"),
        (b'{"Name":"a"} x', "unexpected data after"),
        (b"\xef\xbb\xbf{}", "byte order mark"),
        (b'{"Ratio":NaN}', "NaN is not JSON"),
        (b'{"Ratio":Infinity}', "Infinity is not JSON"),
        (b"[1]", "not an object"),
        (b'"x"', "not an object"),
        (b'{"Name":1}', "field Name must be a string"),
        (b'{"Count":"1"}', "field Count must be an integer"),
        (b'{"Count":1.0}', "field Count must be an integer"),
        (b'{"Count":1e3}', "field Count must be an integer"),
        (b'{"Count":9223372036854775808}', "field Count must be an integer"),
        (b'{"Count":true}', "field Count must be an integer"),
        (b'{"On":1}', "field On must be a bool"),
        (b'{"Ratio":1e999}', "field Ratio must be a number"),
        (b'{"Ratio":"1"}', "field Ratio must be a number"),
        (b"[" * 2000 + b"]" * 2000, "nested deeper than 64"),
        (b'{"a":' * 65 + b"1" + b"}" * 65, "nested deeper than 64"),
        (b'{"Name":"\x01"}', "malformed JSON"),  # raw control characters in strings
    ],
)
def test_refuses_with_a_typed_error(text: bytes, message: str) -> None:
    with pytest.raises(GoJSONError, match=message) as e:
        decode(text, FIELDS, "test")
    assert len(str(e.value)) < 120  # short, and never the input echoed back


def test_error_names_the_field_by_its_spec_name_not_the_input() -> None:
    """A client's key name (which may be 200 KB of control characters) never reaches a message."""
    with pytest.raises(GoJSONError) as e:
        decode(b'{"NAME\\u0000' + b"" + b'":1,"nAmE":1}', FIELDS, "ClientInfo")
    assert str(e.value) == "ClientInfo: field Name must be a string"


def test_depth_bound_is_exact_and_ignores_brackets_in_strings() -> None:
    assert parse(b"[" * 64 + b"]" * 64) is not None
    with pytest.raises(GoJSONError):
        parse(b"[" * 65 + b"]" * 65)
    deep_string = b'{"Name":"' + b"[{" * 10_000 + b'"}'
    assert decode(deep_string, FIELDS, "test") == {"Name": "[{" * 10_000}
    assert nesting_depth('["]\\"[[[", [1, [2]]]') == 3
    assert nesting_depth("42") == 0


def test_size_bound_and_first_value_only() -> None:
    with pytest.raises(GoJSONError, match="longer than 10 bytes"):
        parse(b'{"Name":"abc"}', max_size=10)
    assert parse(b'{"On":true} trailing', first_value_only=True) == Pairs([("On", True)])
    assert gojson.to_python(parse(b'{"a":[1,2.5,{"b":null}],"a":3}')) == {"a": 3}


def test_fold_is_go_simple_folding() -> None:
    assert fold("AppName") == fold("appname") == "APPNAME"
    assert fold("I\u017fProber") == fold("isprober")  # long s folds to S
    assert fold("mesh\u212aey") == fold("meshkey")  # Kelvin sign folds to K
    assert fold("stra\u00dfe") != fold("strasse")  # no full folding (ß is not ss)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_parse_reads_what_json_writes(value: object) -> None:
    assert gojson.to_python(parse(json.dumps(value).encode())) == _as_go(value)


def _as_go(value: object) -> object:
    """What ``to_python`` makes of a value: ints beyond int64 become floats, as a Go number would."""
    if isinstance(value, dict):
        return {k: _as_go(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_go(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not gojson.INT64_MIN <= value <= gojson.INT64_MAX:
        return float(value)
    return value


@settings(max_examples=500)
@given(st.binary(max_size=300) | st.text(alphabet='[]{}",:0123456789.eE+-tfnrul \\x', max_size=300).map(str.encode))
def test_any_input_is_a_value_or_a_go_json_error(data: bytes) -> None:
    try:
        doc = parse(data)
    except GoJSONError:
        return
    try:
        fill(doc, FIELDS, "fuzz")
    except GoJSONError:
        pass
