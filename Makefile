# Two commands: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: run test lint bench clean

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

test: $(VENV)/.installed-test
	@scripts/ensure-test-tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
