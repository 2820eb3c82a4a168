# Far Mesh — two commands do everything on a fresh machine:
#   make demo   a whole local mesh from the real parts on embedded defaults: generates text, pays the providers
#               through the payment tracker on a local chain, shuts down (`far-mesh up` keeps it running)
#   make test   the test suite (installs first if needed)
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.far-mesh-installed
PYTEST_ARGS ?=

.PHONY: install install-gpu demo test test-quick multihost lock clean-state bench help

help:
	@echo "make demo     run a whole local mesh (installs first if needed)"
	@echo "make test     run the test suite (installs first if needed)"
	@echo "make test-quick  the quick tier: every test that starts no Petals swarm (pytest -m 'not swarm')"
	@echo "make install  create .venv with the pinned, tested dependency set (idempotent)"
	@echo "make install-gpu   the same with CUDA torch and nvidia-ml-py, for GPU providers (docs/provider.md)"
	@echo "make lock     re-resolve requirements/base.in into requirements/lock.txt"
	@echo "make bench    run the benchmarks in bench/"
	@echo "make multihost  the mesh across network namespaces (root; docs/multihost.md)"
	@echo "make contracts / contracts-check   rebuild / verify the committed Solidity artifacts"

install: $(STAMP)

# The stamp depends on the lock and the project metadata: a second `make install` is a no-op.
$(STAMP): requirements/lock.txt requirements/no-deps.txt pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh
	@touch $(STAMP)

# GPU providers: the lock with CUDA torch + NVML (requirements/gpu.txt). It touches the stamp so that a later
# `make demo` does not put the CPU torch back; `make install` after a lock change does (run install-gpu again).
install-gpu:
	PYTHON=$(PYTHON) bash scripts/install.sh --gpu
	@touch $(STAMP)

demo: install
	$(PY) -m infra.demo

test: install
	bash scripts/run_tests.sh $(PYTEST_ARGS)

# The quick tier: no Petals swarm is started (tests that need one are marked swarm; tests/conftest.py checks it).
# It runs on one worker per core (at most 8: each claims a Redis database); --dist loadfile keeps a module's
# tests, and so its module-scoped fixtures, on one worker.
test-quick: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not swarm" -n auto --maxprocesses 8 --dist loadfile $(PYTEST_ARGS)

# Every part on a host of its own (network namespaces, needs root and iproute2; skips with the reason otherwise).
multihost: install
	$(PY) -m pytest -v -rs tests/test_multihost.py $(PYTEST_ARGS)

bench: install
	$(PY) bench/swarm_vs_local.py

lock:
	PYTHON=$(PYTHON) bash scripts/lock.sh

include contracts/Makefile.inc

clean-state:
	$(PY) -m infra.embedded down || true
	rm -rf .far-mesh
