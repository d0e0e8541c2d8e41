"""The one binding path (``derpd.net.addr.bind_sockets``): wildcard hosts, dual-stack, names that
resolve to several addresses, and one port for all of them. STUN's own behaviour on top of it
(pktinfo, answering from the destination address) is in test_stun_server.py."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from derpd.net.addr import bind_sockets, lookup_name


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


NEEDS_IPV6 = pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback here")
TYPES = pytest.mark.parametrize("sock_type", [socket.SOCK_STREAM, socket.SOCK_DGRAM])


def _v6only(s: socket.socket) -> int:
    return s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)


@NEEDS_IPV6
@TYPES
@pytest.mark.parametrize("host", ["", "*"])
async def test_every_interface_is_one_dual_stack_socket(host: str, sock_type: int) -> None:
    [s] = await bind_sockets(host, 0, sock_type)
    with s:
        assert s.family == socket.AF_INET6 and _v6only(s) == 0 and s.getsockname()[0] == "::"
        assert s.type == sock_type


@NEEDS_IPV6
@TYPES
async def test_ipv6_any_is_dual_stack_only_when_asked(sock_type: int) -> None:
    [plain] = await bind_sockets("::", 0, sock_type)
    [dual] = await bind_sockets("::", 0, sock_type, dual_stack_any=True)
    with plain, dual:
        assert (_v6only(plain), _v6only(dual)) == (1, 0)


@TYPES
async def test_ipv4_any_is_ipv4_only(sock_type: int) -> None:
    [s] = await bind_sockets("0.0.0.0", 0, sock_type)
    with s:
        assert s.family == socket.AF_INET


@TYPES
async def test_a_name_binds_every_address_on_one_port(sock_type: int) -> None:
    socks = await bind_sockets("localhost", 0, sock_type)
    try:
        assert {s.getsockname()[0] for s in socks} <= {"127.0.0.1", "::1"}
        assert len({s.getsockname()[1] for s in socks}) == 1
        assert all(_v6only(s) == 1 for s in socks if s.family == socket.AF_INET6)
    finally:
        for s in socks:
            s.close()


async def test_listeners_reuse_the_address_and_datagram_sockets_do_not() -> None:
    [tcp] = await bind_sockets("127.0.0.1", 0, socket.SOCK_STREAM)
    [udp] = await bind_sockets("127.0.0.1", 0, socket.SOCK_DGRAM)
    with tcp, udp:
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
        assert udp.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0


async def test_a_busy_port_raises_and_leaves_nothing_bound() -> None:
    [taken] = await bind_sockets("127.0.0.1", 0, socket.SOCK_DGRAM)
    with taken, pytest.raises(OSError) as e:
        await bind_sockets("127.0.0.1", taken.getsockname()[1], socket.SOCK_DGRAM)
    assert e.value.errno == errno.EADDRINUSE


async def test_without_ipv6_every_interface_falls_back_to_ipv4(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: object, **kw: object) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "socket", no_ipv6)
    [s] = await bind_sockets("", 0, socket.SOCK_DGRAM)
    with s:
        assert s.family == socket.AF_INET and s.getsockname()[0] == "0.0.0.0"
    with pytest.raises(OSError) as e:  # "::" asked for IPv6 by name: no fallback
        await bind_sockets("::", 0, socket.SOCK_DGRAM, dual_stack_any=True)
    assert e.value.errno == errno.EAFNOSUPPORT


@given(st.text())
def test_lookup_names_are_bytes_exactly_when_ascii(host: str) -> None:
    name = lookup_name(host)
    if host.isascii():
        assert name == host.encode("ascii")
    else:
        assert name == host  # trio encodes it (IDNA 2008) on its own path


def test_binding_leaves_pythons_idna_codec_unloaded() -> None:
    """The first ``str`` host would import ``encodings.idna`` (and stringprep, unicodedata) for good."""
    code = (
        "import sys, socket, trio\n"
        "from derpd.net.addr import bind_sockets\n"
        "async def main():\n"
        "    for host in ('127.0.0.1', 'localhost'):\n"
        "        for s in await bind_sockets(host, 0, socket.SOCK_STREAM):\n"
        "            s.close()\n"
        "trio.run(main)\n"
        "print(sorted(m for m in ('encodings.idna', 'stringprep') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
