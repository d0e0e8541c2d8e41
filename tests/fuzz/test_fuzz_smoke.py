"""make test's share of the fuzzing (tests/fuzz/README.md).

Every target runs for FUZZ_SMOKE_SECONDS (default 3) in its own process, all of them at once on
the machine's cores, starting from its committed seed corpus; a crash fails that target's test
with the input and the command that reproduces it. Each known, reported crash (targets.KNOWN) is
replayed on its own and expected to fail (strict xfail): when the bug is fixed the test XPASSes,
which fails the run until the entry is deleted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.fuzz import fuzz
from tests.fuzz import targets as T

pytestmark = pytest.mark.fuzz

SECONDS = int(os.environ.get("FUZZ_SMOKE_SECONDS", "3"))


class KnownCrash(Exception):
    """A known crash reproduced as reported."""


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, fuzz.Result]:
    """Fuzz every selected, available target at once (one process each)."""
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_fuzz" and hasattr(item, "callspec")
    ]
    names = [n for n in dict.fromkeys(selected) if T.TARGETS[n].available()]
    engine = "atheris" if fuzz.have_atheris() else "hypothesis"
    jobs = max(2, os.cpu_count() or 2)
    return fuzz.fuzz_many(names, SECONDS, tmp_path_factory.mktemp("fuzz"), engine, jobs=jobs, report=False)


def _keep(path: str, target: str) -> Path:
    """A crashing input outlives pytest's temporary directory: tests/fuzz/out/crashes/<target>/."""
    dest = fuzz.DEFAULT_OUT / "crashes" / target
    dest.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(path, dest))


@pytest.mark.parametrize("name", list(T.TARGETS))
def test_fuzz(name: str, results: dict[str, fuzz.Result]) -> None:
    target = T.TARGETS[name]
    if target.requires:
        pytest.importorskip(target.requires, reason=f"{target.requires} is not there yet")
    r = results[name]
    if r.status in ("crash", "error"):
        lines = [f"fuzz target {name}: {r.status} after {r.runs} runs", r.summary[-4000:]]
        for artifact in r.artifacts:
            kept = _keep(artifact, name)
            data = kept.read_bytes()
            lines.append(f"input ({len(data)} bytes): {data[:300]!r}{'...' if len(data) > 300 else ''}")
            lines.append(f"reproduce: {fuzz.repro_command(name, kept)}")
        pytest.fail("\n".join(lines), pytrace=False)
    assert r.status == "ok", r.summary
    assert r.runs > 0, f"{name} ran no inputs:\n{r.log[-2000:]}"
    for line in r.known:
        assert "still reproduces" in line, f"known crash replay: {line}"


def _known_params() -> list[object]:
    return [
        pytest.param(
            k,
            id=f"{k.target}-{k.seed}",
            marks=pytest.mark.xfail(
                strict=True,
                raises=KnownCrash,
                reason=f"known bug: {k.reason}. If this XPASSes the bug is fixed: delete the entry for "
                f"{k.seed!r} in tests/fuzz/targets.py KNOWN (keep the seed file)",
            ),
        )
        for k in T.KNOWN
    ]


@pytest.mark.parametrize("known", _known_params())
def test_known_crash(known: T.Known) -> None:
    target = T.TARGETS[known.target]
    if target.requires:
        pytest.importorskip(target.requires)
    one_input = target.build()
    try:
        one_input((target.corpus / known.seed).read_bytes())
    except Exception as e:
        if known.matches(e):
            raise KnownCrash(f"{type(e).__name__}: {str(e)[:200]}") from e
        raise
