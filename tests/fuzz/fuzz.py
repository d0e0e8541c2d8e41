# ruff: noqa: PLC0415  (imports inside functions on purpose: the fuzzer instruments what they load)
"""Run the fuzz targets (``make fuzz``), or replay saved inputs.

    python tests/fuzz/fuzz.py [--seconds N] [--jobs J] [TARGET ...] [-- LIBFUZZER-FLAG ...]
    python tests/fuzz/fuzz.py --repro TARGET FILE ...                 run saved inputs once, with tracebacks
    python tests/fuzz/fuzz.py --list

Each target runs in its own process: atheris (libFuzzer, coverage-guided over derpd/ and stun/)
when it is installed, else a hypothesis-driven fallback. Seeds come from corpus/<target>/ (committed);
new interesting inputs go to out/corpus/<target>/ and crashing ones to out/crashes/<target>/
(out/ is ignored by git). The exit status is 1 when any target crashed in a way not listed in
targets.KNOWN, 2 on a usage or harness error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

if __package__:
    from . import targets as T
else:  # run as a script: python tests/fuzz/fuzz.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import targets as T  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_OUT = HERE / "out"
INSTRUMENT = ["derpd", "stun"]
KNOWN_MARK = "fuzz: known crash"


def have_atheris() -> bool:
    import importlib.util

    return importlib.util.find_spec("atheris") is not None


def _rel(path: Path | str) -> str:
    p = Path(path)
    with contextlib.suppress(ValueError):
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    return str(p)


def repro_command(target: str, path: Path | str) -> str:
    py = sys.executable
    with contextlib.suppress(ValueError):
        py = str(Path(py).relative_to(Path.cwd()))
    return f"{py} {_rel(HERE / 'fuzz.py')} --repro {target} {shlex.quote(_rel(path))}"


# --- the worker: one target in this process ----------------------------------------------------


def _read_dict(name: str | None) -> list[bytes]:
    """Tokens of a libFuzzer dictionary file (``name="value"`` lines, \\xNN escapes)."""
    if name is None:
        return []
    tokens = []
    for line in (T.DICTS / name).read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r'\s*(?:\w+\s*=\s*)?"(.*)"\s*', line)
        if m:
            tokens.append(re.sub(rb"\\x([0-9a-fA-F]{2})|\\(.)", _unescape, m.group(1).encode()))
    return tokens


def _unescape(m: re.Match[bytes]) -> bytes:
    return bytes([int(m.group(1), 16)]) if m.group(1) else m.group(2)


def _tolerating_known(target: T.Target, one_input: T.OneInput, strict: bool) -> T.OneInput:
    """Fuzz on past the crashes already reported (KNOWN), after checking they still reproduce."""
    known = [] if strict else T.known_for(target.name)
    for k in known:
        if k.target != target.name:
            continue  # another target's bug this one reaches too: replayed there
        try:
            one_input((target.corpus / k.seed).read_bytes())
        except Exception as e:
            state = "still reproduces" if k.matches(e) else f"now raises {type(e).__name__}: {e}"[:200]
        else:
            state = "NO LONGER REPRODUCES: fixed? delete its entry in tests/fuzz/targets.py KNOWN"
        print(f"{KNOWN_MARK} {k.seed}: {state} ({k.reason})", flush=True)
    if not known:
        return one_input

    def one(data: bytes) -> None:
        try:
            one_input(data)
        except Exception as e:
            if not any(k.matches(e) for k in known):
                raise

    return one


def worker(name: str, seconds: int, out: Path, engine: str, strict: bool, extra: list[str]) -> None:
    target = T.TARGETS[name]
    corpus, crashes = out / "corpus" / name, out / "crashes" / name
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    if engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=INSTRUMENT):
            one_input = target.build()
        one_input = _tolerating_known(target, one_input, strict)
        args = [
            sys.argv[0],
            f"-max_total_time={max(1, seconds)}",
            f"-max_len={target.max_len}",
            f"-artifact_prefix={crashes}/",
            "-timeout=25",
            "-rss_limit_mb=2560",
            "-print_final_stats=1",
        ]
        if target.dict:
            args.append(f"-dict={T.DICTS / target.dict}")
        args += [*extra, str(corpus), str(target.corpus)]
        print("fuzz: libFuzzer " + " ".join(args[1:]), flush=True)
        atheris.Setup(args, one_input)
        atheris.Fuzz()  # exits the process
    else:
        one_input = _tolerating_known(target, target.build(), strict)
        sys.exit(_hypothesis(target, one_input, seconds, corpus, crashes))


def _hypothesis(target: T.Target, one_input: T.OneInput, seconds: int, corpus: Path, crashes: Path) -> int:
    """The fallback engine: not coverage-guided, but big budgets of random and mutated seeds."""
    import hashlib

    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import strategies as st

    seeds = [p.read_bytes()[: target.max_len] for p in [*target.seeds(), *sorted(corpus.iterdir())] if p.is_file()]
    tokens = _read_dict(target.dict) or [b"\x00", b"\xff"]
    runs = 0
    failing: list[bytes] = []

    def one(data: bytes) -> None:
        nonlocal runs
        runs += 1
        try:
            one_input(data)
        except Exception:
            failing.append(data)
            raise

    def mutate(seed: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
        for where, cut, insert in edits:
            at = where % (len(seed) + 1)
            seed = seed[:at] + insert + seed[at + cut :]
        return seed[: target.max_len]

    insert = st.sampled_from(tokens) | st.binary(max_size=8)
    edit = st.tuples(st.integers(0, target.max_len), st.integers(0, 16), insert)
    strategy = st.binary(max_size=target.max_len)
    if seeds:
        mutated = st.builds(mutate, st.sampled_from(seeds), st.lists(edit, max_size=8))
        strategy = st.one_of(mutated, mutated, strategy)

    @settings(
        max_examples=500,
        deadline=None,
        database=None,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        report_multiple_bugs=False,
    )
    @given(strategy)
    def prop(data: bytes) -> None:
        one(data)

    start = time.monotonic()
    try:
        for seed in seeds:
            one(seed)
        while time.monotonic() - start < seconds:
            prop()
    except Exception as e:
        data = failing[-1]
        path = crashes / ("crash-" + hashlib.sha1(data).hexdigest())
        path.write_bytes(data)
        print("\n === Uncaught Python exception: ===", flush=True)
        traceback.print_exception(e, file=sys.stdout)
        print(f"Test unit written to {path}")
        print(f"stat::number_of_executed_units: {runs}")
        return 1
    took = time.monotonic() - start
    print(f"stat::number_of_executed_units: {runs}\nDone {runs} runs in {took:.0f} second(s)")
    return 0


# --- the orchestrator ------------------------------------------------------------------------


@dataclass
class Result:
    target: str
    status: str = "ok"  # ok, crash, skipped, error
    runs: int = 0
    seconds: float = 0.0
    cov: int | None = None
    corpus: int | None = None
    artifacts: list[str] = field(default_factory=list)
    summary: str = ""  # the traceback (or libFuzzer's complaint) for a crash
    known: list[str] = field(default_factory=list)  # known-crash replay lines
    log: str = ""
    log_path: str = ""

    @property
    def crashed(self) -> bool:
        return self.status == "crash"

    @property
    def known_unfixed(self) -> bool:
        return any("still reproduces" in line for line in self.known)


def _parse(result: Result, log: str) -> None:
    result.log = log
    runs = re.findall(r"stat::number_of_executed_units: (\d+)", log) or re.findall(r"^#(\d+)\s", log, re.M)
    result.runs = int(runs[-1]) if runs else 0
    if cov := re.findall(r"\bcov: (\d+)", log):
        result.cov = int(cov[-1])
    if corp := re.findall(r"\bcorp: (\d+)/", log):
        result.corpus = int(corp[-1])
    result.known = [line[len(KNOWN_MARK) + 1 :] for line in log.splitlines() if line.startswith(KNOWN_MARK)]
    result.artifacts = [
        a for a in re.findall(r"Test unit written to (\S+)", log) if not Path(a).name.startswith("slow-unit-")
    ]
    if result.artifacts:
        result.status = "crash"
        m = re.search(r"=== Uncaught Python exception: ===\n(.*?)(?:\n==\d+== ERROR|\nTest unit written|\Z)", log, re.S)
        if m:
            result.summary = m.group(1).strip()
        else:
            result.summary = "\n".join(re.findall(r"^==\d+== ERROR: libFuzzer: .*$", log, re.M)) or log[-2000:]


def fuzz_one(
    name: str, seconds: int, out: Path, engine: str, strict: bool = False, extra: list[str] | None = None
) -> Result:
    result = Result(name)
    target = T.TARGETS[name]
    if not target.available():
        result.status, result.summary = "skipped", f"{target.requires} is not there"
        return result
    (out / "logs").mkdir(parents=True, exist_ok=True)
    log_path = out / "logs" / f"{name}.log"
    cmd = [sys.executable, str(HERE / "fuzz.py"), "--worker", name, "--seconds", str(seconds), "--out", str(out)]
    cmd += ["--engine", engine] + (["--strict"] if strict else []) + ["--", *(extra or [])]
    started = time.monotonic()
    with open(log_path, "w+", encoding="utf-8", errors="replace") as log:
        try:
            proc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, timeout=seconds + 120, cwd=REPO, check=False
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -1
        log.seek(0)
        text = log.read()
    result.seconds = time.monotonic() - started
    result.log_path = str(log_path)
    _parse(result, text)
    if not result.crashed and rc != 0:
        result.status = "error"
        result.summary = f"worker exited with {rc}:\n{text[-3000:]}"
    return result


def fuzz_many(
    names: list[str],
    seconds: int,
    out: Path,
    engine: str,
    jobs: int = 1,
    strict: bool = False,
    extra: list[str] | None = None,
    report: bool = True,
) -> dict[str, Result]:
    results: dict[str, Result] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(fuzz_one, n, seconds, out, engine, strict, extra): n for n in names}
        for future in concurrent.futures.as_completed(futures):
            r = future.result()
            results[r.target] = r
            if report:
                print(describe(r), flush=True)
    return {n: results[n] for n in names}


def describe(r: Result) -> str:
    if r.status == "skipped":
        return f"{r.target:15} skipped: {r.summary}"
    rate = f" ({r.runs / r.seconds:.0f}/s)" if r.seconds else ""
    cov = f", cov {r.cov}" if r.cov is not None else ""
    corpus = f", corpus {r.corpus}" if r.corpus is not None else ""
    lines = [f"{r.target:15} {r.status.upper():6} {r.runs} runs in {r.seconds:.0f} s{rate}{cov}{corpus}"]
    lines += [f"    known: {k}" for k in r.known]
    if r.status in ("crash", "error"):
        summary = r.summary.splitlines()
        lines += ["    " + line for line in [*summary[-1:], "...", *summary[-10:-1]]]
        lines += [f"    input: {a}\n    repro: {repro_command(r.target, a)}" for a in r.artifacts]
        lines.append(f"    log:   {_rel(r.log_path)}")
    return "\n".join(lines)


def repro(name: str, files: list[str]) -> int:
    one_input = T.TARGETS[name].build()
    failed = 0
    for f in files:
        data = Path(f).read_bytes()
        try:
            one_input(data)
        except Exception:
            failed += 1
            print(f"{f}: CRASH on {len(data)} bytes {data[:120]!r}{'...' if len(data) > 120 else ''}")
            traceback.print_exc()
        else:
            print(f"{f}: ok")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", help="targets to fuzz (default: all); commas work too")
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "60")), help="per target")
    ap.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once")
    engines = ("auto", "atheris", "hypothesis")
    ap.add_argument("--engine", choices=engines, default=os.environ.get("FUZZ_ENGINE", "auto"))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--strict", action="store_true", help="stop at known crashes too instead of fuzzing past them")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--repro", metavar="TARGET", help="run the given files once through TARGET")
    ap.add_argument("--worker", metavar="TARGET", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # after --: more libFuzzer flags
    args = ap.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if have_atheris() else "hypothesis"
    if args.worker:
        worker(args.worker, args.seconds, args.out, engine, args.strict, extra)
        return 0
    if args.list:
        for t in T.TARGETS.values():
            print(f"{t.name:15} {t.doc}{'' if t.available() else f'  [skipped: no {t.requires}]'}")
        return 0
    if args.repro:
        if args.repro not in T.TARGETS:
            ap.error(f"unknown target {args.repro!r}")
        return repro(args.repro, args.targets)
    names = [n for arg in args.targets for n in arg.replace(",", " ").split()] or list(T.TARGETS)
    unknown = [n for n in names if n not in T.TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(T.TARGETS)}")
    print(f"fuzz: {len(names)} target(s), {args.seconds} s each, engine {engine}, output in {_rel(args.out)}/")
    results = fuzz_many(names, args.seconds, args.out, engine, args.jobs, args.strict, extra)
    bad = [r for r in results.values() if r.status in ("crash", "error")]
    total = sum(r.runs for r in results.values())
    print(f"fuzz: {total} runs; " + (f"FAILED: {', '.join(r.target for r in bad)}" if bad else "no new crashes"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
