# SynthKit: `make install` then `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/data
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install test test-all bench bench-synth bench-synthseg bench-synthstrip train-synthseg \
        train-synthstrip clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q -m "not slow" tests

test-all: install
	$(PY) -m pip install -q -e '.[dev,jax]'
	$(PY) -m pytest -q tests

bench: bench-synth bench-synthseg bench-synthstrip

bench-synth: install
	$(PY) scripts/bench_synth.py --labels $(DATA)/label_maps --out docs/bench_synth.md

bench-synthseg: install
	$(PY) scripts/bench_synthseg.py --data $(DATA)/dev_eval --out docs/bench_synthseg.md

# Skull stripping vs Colin27 (BET, Debian mricron-data, fetched into .cache/mricron) and ixi002
# (HD-BET), side by side with deepbet, which lives in its own venv: torch pinned to the CPU build
# that pip finds on this machine's disk (a plain `torch` would pull a multi-GB CUDA build).
BENCH_VENV ?= .venv-bench
BENCH_TORCH ?= torch==2.13.0

bench-synthstrip: install
	$(MAKE) --no-print-directory $(BENCH_VENV)/.installed || echo 'deepbet venv not installed: benchmarking without deepbet'
	$(PY) scripts/bench_synthstrip.py --data $(DATA)/dev_eval --cache .cache/mricron \
	    --deepbet-python $(BENCH_VENV)/bin/python --out docs/bench_synthstrip.md

.PHONY: .venv-bench
.venv-bench: $(BENCH_VENV)/.installed

$(BENCH_VENV)/.installed:
	rm -rf $(BENCH_VENV)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q $(BENCH_TORCH) deepbet==1.0.2
	touch $@

# Resumes runs/NAME if present; STEPS sets the total (default: the preset's). INIT=models/NAME
# starts from the shipped weights in a fresh clone.
train-%: install
	$(PY) scripts/train.py --task $* --labels $(DATA)/label_maps --run runs/$* \
	    --export models/$* $(if $(STEPS),--steps $(STEPS)) $(if $(INIT),--init $(INIT))

clean:
	rm -rf $(VENV) build *.egg-info python/*.egg-info .pytest_cache
