"""derpd serve --config FILE (TOML) and derpd check-config."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from derpd import config
from derpd.base.errors import ConfigurationError
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


# --- derpd.config without the command line ------------------------------------------------------------


def test_serve_options_mirror_every_serve_flag() -> None:
    """ServeOptions has exactly one typed field per serve option (the command builds it from them)."""
    names = {p.name for p in serve.params if isinstance(p, click.Option) and p.expose_value}
    assert names == {f.name for f in dataclasses.fields(config.ServeOptions)}
    ctx = serve.make_context("serve", ["--dev"])
    assert config.ServeOptions(**ctx.params).dev is True


def test_build_from_typed_options(tmp_path: Path) -> None:
    cfg = config.build(
        config.ServeOptions(
            addr="127.0.0.1:0",
            key_file=str(tmp_path / "k"),
            stun_host="*",
            verify_cache_ttl=7.0,
            metrics_addr="-1",
            workers="2",
        )
    )
    assert cfg.settings.addr == ("127.0.0.1", 0) and cfg.settings.stun_host == ""
    assert cfg.metrics_addr is None and cfg.workers == 2 and cfg.settings.tls is None
    assert [n.event for n in cfg.notes] == ["key_created"] and (tmp_path / "k").exists()
    dry = config.build(config.ServeOptions(addr=":1", key_file=str(tmp_path / "new")), dry_run=True)
    assert [n.event for n in dry.notes] == ["key_will_be_created"] and not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"addr": "nonsense"}, "--addr: bad address"),
        ({"metrics_addr": "x:y"}, "--metrics-addr:"),
        ({"home": "ftp://x"}, "--home must be"),
        ({"workers": "0"}, "workers"),
        ({"mesh_with": "a b"}, "--mesh-with"),
        ({"mesh_with": "peer.example.com"}, "needs the region's mesh key"),
        ({"certdir": "/tmp"}, "--certdir only applies"),
        ({"certmode": "manual"}, "needs --hostname"),
        ({"trusted_proxies": "not-a-cidr"}, "--trusted-proxies"),
        ({"proxy_protocol": True}, "needs --trusted-proxies"),
        ({"verify_client_url": "ftp://x"}, "verify-client-url"),
        ({"rate_config": "/nonexistent/rate.json"}, "cannot read rate config"),
        ({"mesh_psk_file": "/nonexistent/mesh.key"}, "cannot read mesh key file"),
    ],
)
def test_every_bad_setting_is_one_configuration_error(tmp_path: Path, options: dict[str, object], words: str) -> None:
    """Every layer's own error (AddressError, MeshError, AdmissionError, LimitError, WorkerError,
    CertError, key errors) is a ConfigurationError: the command catches that one type."""
    with pytest.raises(ConfigurationError, match=re.escape(words)) as e:
        config.build(config.ServeOptions(**{"key_file": str(tmp_path / "k"), **options}), dry_run=True)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("text", "seconds"), [("2s", 2.0), ("500ms", 0.5), ("1h30m", 5400.0), ("1.5", 1.5), (" 10m ", 600.0), (3, 3.0)]
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2x", "1s2", "-1s", "-1", "nan", "s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        config.parse_duration(text)


def test_read_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("stun-port = \n")
    with pytest.raises(ConfigurationError, match="config file"):
        config.read_config_file(str(bad))
    twice = tmp_path / "twice.toml"
    twice.write_text("stun-port = 1\nstun_port = 2\n")
    with pytest.raises(ConfigurationError, match="given twice"):
        config.read_config_file(str(twice))
    with pytest.raises(ConfigurationError, match="cannot read config file"):
        config.read_config_file(str(tmp_path / "missing.toml"))
