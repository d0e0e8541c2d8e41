# Two commands: `make run` and `make test`. Both create .venv on first use.
# `make fuzz` fuzzes the sans-IO parsers (tests/fuzz/README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: run test lint fuzz bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The project itself (runtime dependencies only).
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e .
	@touch $@

# Test extras. pystun3 ships a top-level module named `stun`, which would clash with
# derpd's own `stun` package, so it lives in its own directory and tests run it
# in a subprocess with that directory on PYTHONPATH.
$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps --target $(VENV)/pystun3 pystun3==2.0.0
	@touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(VENV)/bin/derpd serve --dev

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: $(VENV)/.installed-test
	@scripts/ensure-test-tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

# Coverage-guided fuzzing (atheris/libFuzzer; hypothesis where atheris has no wheel): every target
# for FUZZ_SECONDS each, or only FUZZ_TARGET ("stun" or "stun,proxyproto"); FUZZ_JOBS targets at once.
# Crashes are saved under tests/fuzz/out/crashes/ with the command that reproduces them.
FUZZ_SECONDS ?= 60
FUZZ_TARGET  ?=
FUZZ_JOBS    ?= 1
FUZZ_ARGS    ?=
fuzz: $(VENV)/.installed-test
	$(PY) tests/fuzz/fuzz.py --seconds $(FUZZ_SECONDS) --jobs $(FUZZ_JOBS) $(FUZZ_ARGS) $(FUZZ_TARGET)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
