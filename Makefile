# Two commands set everything up on a fresh machine with Python 3.11+:
#   make demo   runs the closed loop on the embedded broker and Redis
#   make test   runs the test suite (it starts its own broker and Redis)
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
            command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            && echo $$p && break; done)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast faults bench lint clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11+ is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ia demo --json demo-summary.json

# The fault suite's full trials (faults_long) run in `make faults`; `make test`
# runs the same tests with fewer trials (faults_quick), in two processes
# (pytest-xdist; tests/conftest.py keeps each module, and all fault trials, on one).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -p tests.fault_support -m "not faults_long" --durations=20

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The full fault trials: kill -9 of workers, actuators and the audit writer, the
# broker paused, Redis crashed/stopped/paused under the actuator, rebalances,
# SIGTERM, hostile input; prints a summary (also .ia/faults-summary.json).
# IA_FAULT_TRIALS (kills per trial) and IA_FAULT_SEED (replay) pass through.
faults: $(STAMP)
	$(BIN)/python -m pytest -q -rxX -p tests.fault_support -m "faults and not faults_quick" \
	  tests/test_faults*.py

bench: $(STAMP)
	$(BIN)/ia bench --json bench.json

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python scripts/lint_imports.py

clean:
	rm -rf $(VENV) .ia .pytest_cache demo-summary.json
