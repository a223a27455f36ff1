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

bench: bench-synth bench-synthseg

bench-synth: install
	$(PY) scripts/bench_synth.py --labels $(DATA)/label_maps --out docs/bench_synth.md

bench-synthseg: install
	$(PY) scripts/bench_synthseg.py --data $(DATA)/dev_eval --out docs/bench_synthseg.md

# Resumes runs/NAME if present; STEPS sets the total (default: the preset's). INIT=models/NAME
# starts from the shipped weights in a fresh clone.
train-%: install
	$(PY) scripts/train.py --task $* --labels $(DATA)/label_maps --run runs/$* \
	    --export models/$* $(if $(STEPS),--steps $(STEPS)) $(if $(INIT),--init $(INIT))

clean:
	rm -rf $(VENV) build *.egg-info python/*.egg-info .pytest_cache
