# Two commands on a fresh machine: `make run` (stack on the embedded CPU profile) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1

.PHONY: setup run test bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip check
	touch $@

run: setup
	$(VENV)/bin/small4 up

test: setup
	.ci/loopback-only $(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	.ci/loopback-only $(PY) bench/engine_decode.py
	.ci/loopback-only $(PY) bench/stack_overhead.py
	.ci/loopback-only $(PY) bench/tracing_overhead.py
	$(PY) bench/multimodal_preprocess.py
