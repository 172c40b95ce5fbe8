# Two commands on a fresh machine: `make run` (stack on the embedded CPU profile) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1

LOCK := .ci/constraints.txt
CONSTRAINTS ?= $(LOCK)

# The SGLang conformance tier runs in its own venv (sglang pins a CUDA torch), built once from
# its lock and cached outside the clone under the lock's hash.
SGLANG_LOCK := .ci/sglang-lock.txt
SGLANG_CACHE ?= $(HOME)/.cache/small4
SGLANG_VENV ?= $(SGLANG_CACHE)/sglang-$(shell sha256sum $(SGLANG_LOCK) | cut -c1-16)

.PHONY: setup run test bench relock test-sglang relock-sglang
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

# Everything of SGLang that runs without a GPU, against the real library (tests/sglang, and the
# adapter's contract tests, which use SGLang's own classes where it imports).
test-sglang: $(SGLANG_VENV)/.installed
	.ci/loopback-only env PYTHONPATH=$(CURDIR) $(SGLANG_VENV)/bin/python -m pytest -q \
	  -p no:cacheprovider tests/sglang tests/contract/test_sglang_adapter.py $(PYTEST_ARGS)

# No prerequisite: the lock's content is in the path (a fresh clone's newer lock file must not
# rebuild a venv of the same lock).
$(SGLANG_VENV)/.installed:
	rm -rf $(SGLANG_VENV)
	mkdir -p $(SGLANG_CACHE)
	python3 -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install -q --upgrade pip
	$(SGLANG_VENV)/bin/python -m pip install -q --no-deps -r $(SGLANG_LOCK)
	$(SGLANG_VENV)/bin/python -m pip check
	touch $@

# Resolve the sglang extra afresh (with the project's dev tools) and write its lock.
relock-sglang:
	rm -rf .venv-relock-sglang
	python3 -m venv .venv-relock-sglang
	.venv-relock-sglang/bin/python -m pip install -q --upgrade pip
	.venv-relock-sglang/bin/python -m pip install -q ".[sglang,dev]"
	{ sed -n '/^#/p' $(SGLANG_LOCK); .venv-relock-sglang/bin/python -m pip freeze --all \
	  --exclude-editable | grep -viE '^(small4|pip==)'; } > $(SGLANG_LOCK).new
	mv $(SGLANG_LOCK).new $(SGLANG_LOCK)
	rm -rf .venv-relock-sglang

run: setup
	$(VENV)/bin/small4 up

test: setup
	.ci/loopback-only $(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	.ci/loopback-only $(PY) bench/engine_decode.py
	.ci/loopback-only $(PY) bench/stack_overhead.py
	.ci/loopback-only $(PY) bench/tracing_overhead.py
	$(PY) bench/multimodal_preprocess.py
