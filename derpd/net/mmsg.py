"""The kernel's ``recvmmsg``/``sendmmsg`` through ctypes: Python's socket module has neither.

Only the structures and the two functions: the STUN responder (``derpd.server.stun``) and the STUN
load generator (``bench.stun``) build their own buffers around them.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any, Final

__all__ = ["MMSG", "IOVec", "MMsgHdr", "MsgHdr"]


class IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class MsgHdr(ctypes.Structure):
    # The kernel's struct user_msghdr (what glibc's and musl's msghdr amount to on Linux).
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_uint32),
    ]


class MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", MsgHdr), ("msg_len", ctypes.c_uint32)]


def _load() -> tuple[Any, Any] | None:
    """libc's recvmmsg and sendmmsg, or None where they cannot be used safely.

    Their users read and write the buffers through ``unsigned long`` and ``uint32`` views, so
    pointers and ``size_t`` must be the size of an ``unsigned long`` (true on every Linux ABI
    but x32) and every field must sit on its own size.
    """
    if sys.platform != "linux":
        return None
    word = ctypes.sizeof(ctypes.c_ulong)
    if not ctypes.sizeof(ctypes.c_void_p) == ctypes.sizeof(ctypes.c_size_t) == word:
        return None
    if ctypes.sizeof(MMsgHdr) % word or MsgHdr.msg_namelen.offset % 4 or MMsgHdr.msg_len.offset % 4:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    recvmmsg.restype = ctypes.c_int
    sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


# (recvmmsg, sendmmsg), or None where they cannot be used safely (not Linux, or an odd ABI).
MMSG: Final = _load()
