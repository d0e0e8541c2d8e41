"""The common HTTP/1.1 request head, parsed in one pass: the DERP upgrade's fast path, sans I/O.

Every DERP client opens with the same few lines (``GET /derp HTTP/1.1``, ``Host``, ``Upgrade: DERP``,
``Connection: Upgrade``, ...), in one segment. h11 parses them through a general state machine, at a
cost that showed as a fifth of a whole login's CPU. :func:`parse_simple_head` reads only a strict
subset of HTTP/1.1 and answers for nothing else: a head it accepts is one that h11 accepts too, with the
same method, target, version, headers (names lower-cased, values without surrounding whitespace) and
the same bytes after it (``tests/test_httphead.py`` checks exactly this against h11, by hypothesis and
by fuzzing). For anything outside the subset it returns None and the caller gives the bytes to h11,
which then decides, and refuses, exactly as it always did.

The subset: the whole head in the bytes given and within ``max_head``; a request line ``METHOD SP
target SP HTTP/1.1``; every line ended by CRLF; header names that are tokens; values of printable
ASCII (spaces inside, no tabs, no obs-text), with optional spaces or tabs around them; exactly one
``Host``; no ``Content-Length`` or ``Transfer-Encoding`` (their rules stay h11's); no obs-fold.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
# Words of visible characters with single or repeated spaces between them (possessive: each byte of a
# value is looked at once, whatever follows it).
_VALUE = rb"(?:[\x21-\x7e]++(?: ++[\x21-\x7e]++)*+)?"
# The whole head in one match, then its header lines in one findall: name ":" OWS value OWS CRLF. The
# possessive OWS and the atomic line keep a hostile line (8 KiB of spaces, then a bad byte) linear: no
# retrying every split of the spaces between the two OWS, nor of earlier lines. (With plain ``*`` such
# a line took 60 ms; now any 8 KiB head takes well under a millisecond, about what h11 takes.)
_LINE = rb"(?>" + _TOKEN + rb":[ \t]*+" + _VALUE + rb"[ \t]*+\r\n)"
_HEAD = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1\r\n(" + _LINE + rb"*+)\r\n")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*+(" + _VALUE + rb")[ \t]*+\r\n")
_FRAMING = (b"content-length", b"transfer-encoding")


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request head in h11's terms: ``headers`` as h11 gives them (lower-case names, in order)."""

    method: bytes
    target: bytes
    http_version: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    size: int  # bytes of the head, its blank line included: what follows is the body or a new protocol


def head_size(target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> int:
    """About what a head took on the wire, as the HTTP core bounds it (``net.httpserver``): h11 bounds a
    head only while it is incomplete, not one that arrives whole in a single read."""
    return sum(len(k) + len(v) + 4 for k, v in headers) + len(target) + 16


def parse_simple_head(data: bytes | bytearray, max_head: int) -> RequestHead | None:
    """The request head at the start of ``data``, if it is complete and within the subset (module
    docstring) and no bigger than ``max_head`` by either measure; None otherwise (let h11 decide).

    Every login of one client (and of every client of one version) sends the same head, so short
    heads are parsed once and the answer remembered (``_REMEMBERED_HEADS`` of them; the value is
    frozen, its headers a tuple). What is parsed is only ``data`` up to the first blank line: no
    line of the subset is empty, so a head that matches ends exactly there, and the bytes after it
    cannot change the answer."""
    end = data.find(b"\r\n\r\n", 0, max_head)
    if end < 0:
        return None  # incomplete within max_head: no match is possible (h11 decides)
    head = data[: end + 4]
    if len(head) <= _REMEMBERED_HEAD_LEN:
        return _remembered_head(bytes(head), max_head)
    return _parse_head(head, max_head)


_REMEMBERED_HEAD_LEN = 1024  # a DERP upgrade is ~100-250 bytes; longer heads are parsed every time
_REMEMBERED_HEADS = 64


@functools.lru_cache(maxsize=_REMEMBERED_HEADS)
def _remembered_head(head: bytes, max_head: int) -> RequestHead | None:
    return _parse_head(head, max_head)


def _parse_head(data: bytes | bytearray, max_head: int) -> RequestHead | None:
    m = _HEAD.match(data, 0, max_head)
    if m is None:
        return None
    headers = tuple([(name.lower(), value) for name, value in _FIELD.findall(m.group(3))])
    hosts = 0
    for name, _ in headers:
        if name == b"host":
            hosts += 1
        elif name in _FRAMING:
            return None
    target = m.group(2)
    if hosts != 1 or head_size(target, headers) > max_head:
        return None
    return RequestHead(m.group(1), target, b"1.1", headers, m.end())
