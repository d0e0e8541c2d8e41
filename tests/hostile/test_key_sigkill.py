"""Attack 8: SIGKILL while ``derpd serve`` creates its key file (a power cut, the OOM killer).

30 starts of ``derpd serve`` with a fresh key path, each killed the instant anything appears in
the key's directory (the key file itself, or the temporary file an atomic write begins with). No
try may leave an empty or partial key file; whatever a try left, the next start must succeed; and
an empty key file (what an older, non-atomic version left behind) is treated as absent, with one
warning.

The 30 starts are forked from one process that has already imported derpd (each then runs the
``serve`` command exactly as the console script does): the same code path, without paying
~0.3 s of interpreter start and imports 30 times.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from derpd.ops.keyfiles import load_key_file, load_or_create_key_file
from derpd.proto.keys import KeyFileError

from ..conftest import child_env
from . import conftest
from .conftest import Derpd

pytestmark = pytest.mark.hostile

TRIES = 30

# Reads one NUL-separated argument list per line, forks, and runs `derpd <args>` in the child
# (stdout and stderr to /dev/null); answers each line with the child's pid. Children are reaped
# by the kernel (SIGCHLD ignored).
FORK_SERVER = """
import os, signal, sys
from derpd.cli import main
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
null = os.open(os.devnull, os.O_RDWR)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        os.dup2(null, 0); os.dup2(null, 1); os.dup2(null, 2)
        try:
            main(line.rstrip("\\n").split("\\0"))
        finally:
            os._exit(0)
    print(pid, flush=True)
"""


def _state(key: Path) -> str:
    if not key.exists():
        return "absent"
    if key.stat().st_size == 0:
        return "empty"
    try:
        load_key_file(key)
    except KeyFileError:
        return "partial"
    return "complete"


def _start_and_kill(forks: subprocess.Popen[str], key: Path, limit: float = 10.0) -> None:
    args = ["serve", "--addr", "127.0.0.1:0", "--stun-port", "-1", "--metrics-addr", "-1", "--key-file", str(key)]
    assert forks.stdin is not None and forks.stdout is not None
    forks.stdin.write("\0".join(args) + "\n")
    forks.stdin.flush()
    pid = int(forks.stdout.readline())
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:  # as fast as we can: the window may be microseconds
            try:
                if os.listdir(key.parent):
                    break
            except FileNotFoundError:
                pass
        else:
            raise AssertionError(f"nothing appeared in {key.parent} within {limit}s")
    finally:
        os.kill(pid, signal.SIGKILL)


def test_sigkill_during_key_creation(tmp_path: Path) -> None:
    keys = [tmp_path / f"try{i:02d}" / "state" / "derper.key" for i in range(TRIES)]
    env = child_env()
    forks = subprocess.Popen(
        [*conftest.PYTHON, "-c", FORK_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        for key in keys:
            key.parent.parent.mkdir()
            _start_and_kill(forks, key)
    finally:
        assert forks.stdin is not None
        forks.stdin.close()
        forks.wait(10)
    time.sleep(0.1)  # SIGKILL is asynchronous: let the last child be gone before looking
    states = {key: _state(key) for key in keys}
    leftovers = sum(len([f for f in os.listdir(k.parent) if f != k.name]) for k in keys if k.parent.exists())
    tally = Counter(states.values())
    print(f"{TRIES} SIGKILLs during key creation: {dict(tally)}; {leftovers} other files left beside the keys")

    # Whatever each try left, the next start gets a key (this is what serve does first).
    for key in keys:
        load_or_create_key_file(key)
        assert _state(key) == "complete", key
    broken = [str(k) for k, s in states.items() if s in ("empty", "partial")]
    assert not broken, f"{len(broken)} of {TRIES} kills left an empty or partial key file: {dict(tally)}"


def test_start_after_a_kill_with_an_empty_key_file(tmp_path: Path) -> None:
    """A real start where a killed start left its litter and an older version an empty key file:
    it serves, with one warning and no error, and the key file is whole afterwards."""
    forks = subprocess.Popen(
        [*conftest.PYTHON, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    key = tmp_path / "derper.key"
    try:
        _start_and_kill(forks, key)
    finally:
        assert forks.stdin is not None
        forks.stdin.close()
        forks.wait(10)
    time.sleep(0.1)
    key.unlink(missing_ok=True)
    key.touch(mode=0o600)
    d = Derpd(tmp_path, name="derpd-empty-key", log_level="info")
    try:
        d.start()  # also logs in and relays once
        log = d.log().decode()
        warnings = [line for line in log.splitlines() if "level=warning" in line]
        assert len(warnings) == 1 and "key" in warnings[0] and str(key) in warnings[0], log
        assert not re.search(r"level=error|Traceback", log), log
        assert _state(key) == "complete"
    finally:
        d.stop()
