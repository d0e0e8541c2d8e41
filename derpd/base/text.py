"""Making untrusted text safe to show: escaping and clipping, sans I/O.

Anything a client chose (an AppName, a request target, a header value, a JSON field name) may
hold control characters, terminal escapes, bidi overrides or megabytes. Before such text reaches
a log line or an error message it passes through here: every character that is not printable
becomes a backslash escape (``\\x1b``, ``\\u2028``) and the text is cut to a bounded length with a
marker saying how much was cut. Printable text (any script, emoji) is left as it is.
"""

from __future__ import annotations

import re

PEER_TEXT_LIMIT = 64  # characters of a client-chosen string shown in a log line or error
VALUE_LIMIT = 1024  # any other logged value (reasons that may embed client text)

_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# What escape() must touch: backslash and every non-printable character. str.isprintable is
# False for C0/C1 controls, DEL, separators other than space (U+2028, U+2029), format
# characters (bidi overrides, U+FEFF), surrogates and unassigned code points.
_PLAIN = re.compile(r"[^\\]*")


def _escape_char(c: str) -> str:
    short = _SHORT_ESCAPES.get(c)
    if short is not None:
        return short
    if c.isprintable():
        return c
    n = ord(c)
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def escape(text: str) -> str:
    """``text`` with backslashes doubled and every non-printable character escaped."""
    if text.isprintable() and _PLAIN.fullmatch(text):
        return text
    return "".join(map(_escape_char, text))


def clip(text: str, limit: int = PEER_TEXT_LIMIT) -> str:
    """``text`` escaped, at most ``limit`` characters of it, with ``…[+N]`` when N were cut."""
    if len(text) <= limit:
        return escape(text)
    return f"{escape(text[:limit])}…[+{len(text) - limit}]"


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) as one space: an OS or library message
    that may span lines, for a one-line log field or error."""
    return " ".join(str(text).split())


class Peer(str):
    """A string the peer chose. The log shows it escaped and clipped to ``PEER_TEXT_LIMIT``.

    Wrapping costs nothing until a line is written, so call sites mark client text at the
    point they log it: ``log.info("client_connected", app=Peer(info.app_name))``.
    """

    __slots__ = ()
