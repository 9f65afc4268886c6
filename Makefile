# Two commands for a fresh machine: `make repro` (the study) and `make test` (the test suite).
# Both create .venv and install the pinned requirements first.

VENV   ?= .venv
PY     := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install browser qemu testdeps repro faithful verify verify-quick check plots gpu-wheels test test-all lint

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Debian packages the tests need (root/apt), with one `apt-get update` for whichever are missing:
# Chromium, for the headless-browser test of `dvc plots show`, and qemu-user, for tests/test_cpus.py
# (the same trials on emulated Intel Haswell and AMD EPYC CPUs).
APT = apt-get update -qq && apt-get install -y -qq $(1) >/dev/null
browser:
	@command -v chromium >/dev/null || ($(call APT,chromium))

qemu:
	@command -v qemu-x86_64 >/dev/null || ($(call APT,qemu-user))

testdeps:
	@pkgs=""; command -v chromium >/dev/null || pkgs="$$pkgs chromium"; \
	command -v qemu-x86_64 >/dev/null || pkgs="$$pkgs qemu-user"; \
	[ -z "$$pkgs" ] || ($(call APT,$$pkgs))

# Recompute the committed pipeline in a temporary clone (own cache, no run-cache) and compare with dvc.lock.
verify: install
	$(PY) scripts/verify.py

verify-quick: install
	$(PY) scripts/verify.py --quick

# Hash the workspace's outputs again (after a `dvc pull`, say) and compare with dvc.lock: names each file
# whose bytes are wrong, and the fix (docs/remotes.md).
check: install
	$(PY) scripts/check_outputs.py

# scripts/stale_lock.py first: the lock a killed `dvc repro` left would stop this one (docs/resume.md).
repro: install
	$(PY) scripts/stale_lock.py
	dvc repro
	$(PY) -m stages.figures --vendor-js

# The study the original's way (ReLU on the logits, no shuffling, selection on the test pairs) as a
# DVC experiment in a temporary copy; its results go to results/faithful/ for the table of docs/faithful.md.
faithful: install
	$(PY) scripts/faithful.py

# Interactive plots offline: the local Vega bundle, then dvc_plots/index.html.
plots: install
	$(PY) -m stages.figures --vendor-js
	dvc plots show

# DVC and dvclive, with every dependency, as wheels for the GPU machine's Python (3.12, no DVC, no network):
# scripts/run_stages.py unpacks there what its Python lacks. hydra-core's antlr4 runtime has no wheel: built here.
GPU_PY ?= 3.12
gpu-wheels: install
	$(PY) -m pip wheel -q --no-deps -w .gpu-wheels antlr4-python3-runtime==4.9.3
	$(PY) -m pip download -q -d .gpu-wheels --find-links .gpu-wheels --only-binary=:all: \
	  --python-version $(GPU_PY) --implementation cp --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 $$(grep -E '^dvc(live)?==' requirements.txt)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The tests run in parallel, one module per worker (JOBS workers); `make test` leaves out the `system`
# tests (the same results elsewhere: emulated CPUs, Ray, the GPU machine's procedure, a full
# recompute), `make test-all` runs everything, as CI does.
JOBS   ?= 2
PYTEST := $(PY) -m pytest -q -rs --durations=20 -n $(JOBS) --dist loadfile --no-loadscope-reorder

test: install browser lint
	$(PYTEST) -m "not system"

test-all: install testdeps lint
	$(PYTEST)
