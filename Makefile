# Two commands on a fresh machine: `make run` (stack on the embedded CPU profile) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1

LOCK := .ci/constraints.txt
CONSTRAINTS ?= $(LOCK)

.PHONY: setup run test bench relock
setup: $(VENV)/.installed

# pyproject.toml gives the ranges; the lock pins what the suite last passed with, so a new
# release upstream cannot break a clean clone (transformers 5.24 once did).
$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	$(PY) -m pip check
	touch $@

# Resolve the ranges afresh (the same set-up, unconstrained, in a scratch venv) and write the
# lock; run `make test` after.
relock:
	rm -rf .venv-relock
	$(MAKE) setup VENV=.venv-relock CONSTRAINTS=/dev/null
	{ sed -n '/^#/p' $(LOCK); .venv-relock/bin/python -m pip freeze --exclude-editable \
	  | grep -viE '^(torch|small4)'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-relock

run: setup
	$(VENV)/bin/small4 up

test: setup
	.ci/loopback-only $(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	.ci/loopback-only $(PY) bench/engine_decode.py
	.ci/loopback-only $(PY) bench/stack_overhead.py
	.ci/loopback-only $(PY) bench/tracing_overhead.py
	$(PY) bench/multimodal_preprocess.py
