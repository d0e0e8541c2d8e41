"""The derpd command as an operator runs it: real processes, real sockets."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import click
import pytest
import trio

from derpd import __version__
from derpd.cli import MAP_FORMATS, derpmap, serve
from derpd.net.client import DerpClient, RestartingMessage
from derpd.ops.keyfiles import load_key_file
from derpd.proto.keys import public_key_text
from derpd.tools.derpmap import FORMATS, HEADSCALE_YAML
from stun import codec as stun_codec

DERPD = [sys.executable, "-m", "derpd"]


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DERPD, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"derpd {__version__}"


def test_every_serve_flag_has_help_and_env_twin() -> None:
    out = run("serve", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    options = [p for p in serve.params if isinstance(p, click.Option) and p.name != "help"]
    assert len(options) >= 25
    for opt in options:
        flag = opt.opts[0]
        assert flag in text and opt.help
        assert opt.envvar == "DERPD_" + flag[2:].upper().replace("-", "_"), flag
        assert opt.envvar in text.replace("DERPD_ ", "DERPD_")


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--bogus"],
        ["serve", "--addr", "nope", "--dev"],
        ["serve", "--stun-port", "70000", "--dev"],
        ["serve", "--home", "ftp://x", "--dev"],
        ["serve", "--log-level", "loud", "--dev"],
        ["pubkey"],
        ["frobnicate"],
    ],
)
def test_bad_flags_one_error_line_exit_2(args: list[str], tmp_path: Path) -> None:
    out = run(*args, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("derpd: error: "), out.stderr
    assert not (tmp_path / ".derpd").exists()  # nothing was started or created


def test_derpmap_formats_are_the_tools() -> None:
    """derpd.cli names `derpmap --format`'s choices itself (derpd.tools loads only when a tool runs)."""
    assert MAP_FORMATS == FORMATS and MAP_FORMATS[0] == HEADSCALE_YAML
    fmt = next(p for p in derpmap.params if p.name == "fmt")
    assert isinstance(fmt.type, click.Choice) and tuple(fmt.type.choices) == FORMATS and fmt.default == HEADSCALE_YAML


def test_bad_key_file_refused(tmp_path: Path) -> None:
    key = tmp_path / "derper.key"
    assert run("genkey", "--key-file", str(key)).returncode == 0
    key.chmod(0o644)
    out = run("serve", "--key-file", str(key), "--stun-port", "-1", "--addr", "127.0.0.1:0")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "chmod 600" in out.stderr
    key.write_text("{}")
    key.chmod(0o600)
    out = run("serve", "--key-file", str(key), "--stun-port", "-1", "--addr", "127.0.0.1:0")
    assert out.returncode == 2 and 'missing "PrivateKey"' in out.stderr


def test_bad_mesh_key_file_refused(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.key"
    mesh.write_text("not hex")
    mesh.chmod(0o600)
    out = run("serve", "--dev", "--mesh-psk-file", str(mesh), cwd=tmp_path)
    assert out.returncode == 2 and "invalid mesh key" in out.stderr


def test_genkey_and_pubkey(tmp_path: Path) -> None:
    key = tmp_path / "k" / "derper.key"
    out = run("genkey", "--key-file", str(key))
    assert out.returncode == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    pub = public_key_text(load_key_file(key).public)
    assert out.stdout.strip() == pub
    assert run("pubkey", "--key-file", str(key)).stdout.strip() == pub
    out = run("genkey", "--key-file", str(key))  # never overwrites
    assert out.returncode == 2 and "already exists" in out.stderr
    assert run("pubkey", env={"DERPD_KEY_FILE": str(key)}).stdout.strip() == pub  # env twin


async def _start(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[trio.Process, int, list[str]]:
    proc = await trio.lowlevel.open_process(
        [*DERPD, *args], cwd=cwd, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    assert proc.stderr is not None
    lines: list[str] = []
    buf = b""
    with trio.fail_after(20):
        while True:
            chunk = await proc.stderr.receive_some(4096)
            assert chunk, "derpd exited: " + buf.decode()
            buf += chunk
            if b"event=serving" in buf:
                break
    lines = buf.decode().splitlines()
    m = re.search(r"event=serving derp=127\.0\.0\.1:(\d+)", buf.decode())
    assert m, buf
    return proc, int(m.group(1)), lines


async def _stop(proc: trio.Process) -> str:
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    rest = b""
    with trio.fail_after(20):
        while chunk := await proc.stderr.receive_some(4096):
            rest += chunk
        await proc.wait()
    assert proc.returncode == 0
    return rest.decode()


async def test_serve_dev_relays_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc, port, lines = await _start(["serve", "--dev", "--addr", "127.0.0.1:0", "--stun-port", "0"], tmp_path)
    try:
        m = re.search(r"stun=127\.0\.0\.1:(\d+)", "\n".join(lines))
        assert m, lines
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await udp.bind(("127.0.0.1", 0))
        await udp.sendto(stun_codec.binding_request(), ("127.0.0.1", int(m.group(1))))
        with trio.fail_after(5):
            reply, _ = await udp.recvfrom(2048)
        mapped = stun_codec.parse_response(reply)
        assert (str(mapped.address), mapped.port) == udp.getsockname()
        udp.close()
        key_file = tmp_path / ".derpd" / "derper.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        server_pub = load_key_file(key_file).public
        assert any("event=key_created" in line for line in lines)
        url = f"http://127.0.0.1:{port}/derp"
        async with await DerpClient.connect(url) as a, await DerpClient.connect(url) as b:
            assert a.server_key == server_pub
            await a.send(b.public_key, b"through a real derpd process")
            assert (await b.recv_packet()).data == b"through a real derpd process"
            rest = await _stop(proc)  # SIGTERM while both are connected: a graceful goodbye
            with trio.fail_after(5):
                assert isinstance(await a.recv(), RestartingMessage)
    finally:
        if proc.returncode is None:
            await _stop(proc)
    assert "event=shutting_down signal=SIGTERM" in rest and "event=clients_closed count=2" in rest
    for line in lines + rest.splitlines():
        assert re.match(r"ts=\S+ level=\w+ event=\w+", line), line
        assert "privkey" not in line


async def test_empty_key_file_is_replaced_with_a_warning(tmp_path: Path) -> None:
    """A 0-byte key file (what an older version's crash right after creating it left) is treated as
    absent: replaced with a new key and a warning, instead of exit 2 and a Restart= crash loop.
    Anything else that is malformed is still refused (test_bad_key_file_refused)."""
    key = tmp_path / "derper.key"
    key.touch(mode=0o600)
    check = run("check-config", "--key-file", str(key), "--stun-port", "-1", "--addr", "127.0.0.1:0")
    assert check.returncode == 0 and "note: key_will_be_created" in check.stdout
    assert key.stat().st_size == 0  # check-config creates nothing
    args = ["serve", "--key-file", str(key), "--addr", "127.0.0.1:0", "--stun-port", "-1"]
    proc, port, lines = await _start(args, tmp_path)
    try:
        [warning] = [line for line in lines if "event=key_file_empty_replaced" in line]
        assert warning.startswith("ts=") and " level=warning " in warning
        server_pub = load_key_file(key).public
        assert public_key_text(server_pub) in warning
        async with await DerpClient.connect(f"http://127.0.0.1:{port}/derp") as c:
            assert c.server_key == server_pub
    finally:
        await _stop(proc)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["derper.key"]  # no temporary file left behind


async def test_serve_from_environment_only(tmp_path: Path) -> None:
    env = {"DERPD_DEV": "1", "DERPD_ADDR": "127.0.0.1:0", "DERPD_STUN_PORT": "-1", "DERPD_HOME": "blank"}
    proc, port, _ = await _start(["serve"], tmp_path, env)
    try:
        s = trio.socket.socket()
        await s.connect(("127.0.0.1", port))
        await s.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while chunk := await s.recv(4096):
                data += chunk
        s.close()
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    finally:
        await _stop(proc)


def test_port_in_use_fails_cleanly(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run("serve", "--dev", "--addr", f"127.0.0.1:{port}", "--stun-port", "-1", cwd=tmp_path)
    assert out.returncode == 1
    assert "event=startup_failed" in out.stderr and "Traceback" not in out.stderr
