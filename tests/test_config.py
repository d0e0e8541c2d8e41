"""derpd serve --config FILE (TOML) and derpd check-config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from derpd.cli import serve

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "systemd" / "derpd.toml"


def resolved(args: list[str]) -> dict[str, object]:
    """What serve would run with: flags, DERPD_* variables and the config file, resolved by click."""
    ctx = serve.make_context("serve", list(args))
    return dict(ctx.params)


def check(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "derpd", "check-config", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_precedence_flag_env_file_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "d.toml"
    cfg.write_text('stun-port = 1111\nhome = "blank"\ntcp_write_timeout = "3s"\nlog-level = "debug"\n')
    p = resolved(["--config", str(cfg)])
    assert (p["stun_port"], p["home"], p["tcp_write_timeout"], p["log_level"]) == (1111, "blank", 3.0, "debug")
    assert p["tcp_user_timeout"] == 15.0  # untouched keys keep their defaults
    monkeypatch.setenv("DERPD_STUN_PORT", "2222")
    assert resolved(["--config", str(cfg)])["stun_port"] == 2222  # env beats the file
    assert resolved(["--config", str(cfg), "--stun-port", "3333"])["stun_port"] == 3333  # flag beats env


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("bogus = 1", "unknown key 'bogus'"),
        ('stun-port = "3478"', "key 'stun-port' must be an integer, not str"),
        ("stun-port = 99999", "key 'stun-port'"),
        ("dev = 1", "key 'dev' must be true or false"),
        ('certmode = "auto"', "key 'certmode'"),
        ('tcp-user-timeout = "soon"', "key 'tcp-user-timeout'"),
        ("stun-port = 1\nstun_port = 2", "given twice"),
        ("addr = [", "config file"),
        ("help = true", "unknown key 'help'"),
        ('workers = "many"', "--workers must be a number or 'auto'"),
        ('workers = "0"', "--workers must be between 1 and 256"),
    ],
)
def test_bad_config_files_are_refused_with_the_key(tmp_path: Path, content: str, message: str) -> None:
    cfg = tmp_path / "d.toml"
    cfg.write_text(content)
    out = check("--config", str(cfg), "--dev", cwd=tmp_path)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("derpd: error: ") and message in lines[0], lines
    assert not (tmp_path / ".derpd").exists()  # check-config creates nothing


def test_missing_config_file(tmp_path: Path) -> None:
    out = check("--config", str(tmp_path / "none.toml"), cwd=tmp_path)
    assert out.returncode == 2 and "cannot read config file" in out.stderr


def test_check_config_passes_without_side_effects(tmp_path: Path) -> None:
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'key-file = "{tmp_path}/k/derper.key"\ncertmode = "manual"\nhostname = "127.0.0.1"\n')
    out = check("--config", str(cfg), "--stun-port", "-1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "config OK" in out.stdout and "key_will_be_created" in out.stdout
    assert "self_signed_certificate_will_be_created" in out.stdout
    assert not (tmp_path / "k").exists()


def test_shipped_example_names_every_option_and_checks(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    keys = set(re.findall(r"^#?\s*([a-z][a-z0-9-]*)\s*=", text, re.MULTILINE))
    options = {p.opts[0][2:] for p in serve.params if isinstance(p, click.Option) and p.name not in ("help", "config")}
    assert options <= keys, f"missing from systemd/derpd.toml: {sorted(options - keys)}"
    assert keys <= options, f"not options: {sorted(keys - options)}"
    # It is valid as shipped; only what needs this machine's files is overridden.
    mine = ("--hostname", "127.0.0.1", "--certdir", str(tmp_path / "certs"), "--key-file", str(tmp_path / "k"))
    out = check("--config", str(EXAMPLE), *mine, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
