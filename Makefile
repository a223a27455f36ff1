# SynthKit: `make install` then `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/data
export TF_CPP_MIN_LOG_LEVEL ?= 2
# oneDNN convolutions: 4x faster 3-D U-Net training steps on this AMD CPU (5.8 s vs 22 s at 96^3);
# TensorFlow enables them by default only on some Intel CPUs
export TF_ENABLE_ONEDNN_OPTS ?= 1

.PHONY: install test test-all demo bench bench-synth bench-synthseg bench-synthstrip bench-synthmorph bench-synthsr bench-batch \
        train-synthseg train-synthstrip train-synthmorph check-itk clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests

test-all: install
	$(PY) -m pip install -q -e '.[dev,jax]'
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The main jobs on a real scan (Colin27 from Debian's mricron-data, MNI152 from PyPI's nilearn,
# fetched once into .cache/): segmentation, skull stripping, registration, QC pictures in demo/.
demo: install
	$(PY) scripts/demo.py --out demo --cache .cache

bench: bench-synth bench-synthseg bench-synthstrip bench-synthmorph bench-synthsr bench-batch

bench-synth: install
	$(PY) scripts/bench_synth.py --labels $(DATA)/label_maps --out docs/bench_synth.md

bench-synthseg: install
	$(PY) scripts/bench_synthseg.py --data $(DATA)/dev_eval --out docs/bench_synthseg.md \
	    --card models/synthseg.json --parc-card models/synthparc.json

# SynthSR outputs segmented by mri_synthseg (OASIS 1 mm / 1x1x5 / 5x1x1, ixi002 T2, CT-like),
# similarity to the real T1, 256^3 timing; scores into the model card
bench-synthsr: install
	$(PY) scripts/bench_synthsr.py --data $(DATA)/dev_eval --out docs/bench_synthsr.md \
	    --png docs/synthsr_montage.png --card models/synthsr.json

# synthkit-batch (2 workers x 1 thread) against a shell loop of mri_synthseg on 20 scans (5 dev,
# 15 made by mri_synth, cached in .cache/bench_batch), then a run killed halfway and resumed
bench-batch: install
	$(PY) scripts/bench_batch.py --data $(DATA)/dev_eval --labels $(DATA)/label_maps \
	    --work .cache/bench_batch --out docs/bench_batch.md

# Skull stripping vs Colin27 (BET, Debian mricron-data, fetched into .cache/mricron) and ixi002
# (HD-BET), side by side with deepbet; registration side by side with ANTs SyN (antspyx). Both
# live in their own venv: torch pinned to the CPU build that pip finds on this machine's disk (a
# plain `torch` would pull a multi-GB CUDA build).
BENCH_VENV ?= .venv-bench
BENCH_TORCH ?= torch==2.13.0
BENCH_PKGS ?= $(BENCH_TORCH) deepbet==1.0.2 antspyx==0.6.3

bench-synthstrip: install
	$(MAKE) --no-print-directory $(BENCH_VENV)/.installed || echo 'deepbet venv not installed: benchmarking without deepbet'
	$(PY) scripts/bench_synthstrip.py --data $(DATA)/dev_eval --cache .cache/mricron \
	    --deepbet-python $(BENCH_VENV)/bin/python --out docs/bench_synthstrip.md

# Dice of moved asegs on the 6 ordered OASIS pairs, affine and deformable, with ANTs SyN alongside;
# the scores go into the model cards.
bench-synthmorph: install
	$(MAKE) --no-print-directory $(BENCH_VENV)/.installed || echo 'antspyx venv not installed: benchmarking without ANTs'
	$(PY) scripts/bench_synthmorph.py --data $(DATA)/dev_eval \
	    --ants-python $(BENCH_VENV)/bin/python --out docs/bench_synthmorph.md \
	    --card-affine models/synthmorph_affine.json --card-deform models/synthmorph_deform.json

# Our transforms read by ANTs and ANTs' read by us (antspyx from the benchmark venv).
check-itk: install
	$(MAKE) --no-print-directory $(BENCH_VENV)/.installed
	$(PY) scripts/check_itk_interop.py --ants-python $(BENCH_VENV)/bin/python

.PHONY: .venv-bench
.venv-bench: $(BENCH_VENV)/.installed

# The stamp holds the package list it was made with: a changed list (or an older stamp) installs
# again into the same venv, so an existing one gains what was added.
ifneq ($(strip $(shell cat $(BENCH_VENV)/.installed 2>/dev/null)),$(strip $(BENCH_PKGS)))
.PHONY: $(BENCH_VENV)/.installed
endif

$(BENCH_VENV)/.installed:
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q $(BENCH_PKGS)
	echo '$(BENCH_PKGS)' > $@

# Resumes runs/NAME if present; STEPS sets the total (default: the preset's). INIT=models/NAME
# starts from the shipped weights in a fresh clone. PRECISION=auto trains in mixed bfloat16 where
# the CPU (AMX / AVX-512 BF16) or a GPU computes it natively (a new run only).
TRAIN_TASKS := synthseg synthstrip synthstrip_nocsf synthmorph_affine synthmorph_deform synthsr \
	synthsr_lowfield synthparc
.PHONY: $(addprefix train-,$(TRAIN_TASKS))

# A static pattern rule: make skips implicit rules for phony targets, so a plain `train-%`
# did nothing for the phony train-synthseg.
$(addprefix train-,$(TRAIN_TASKS)): train-%: install
	$(PY) scripts/train.py --task $* --labels $(DATA)/label_maps --run runs/$* \
	    --export models/$* $(if $(STEPS),--steps $(STEPS)) $(if $(INIT),--init $(INIT)) \
	    $(if $(PRECISION),--precision $(PRECISION))

# Both SynthMorph models (affine, then deformable); STEPS and INIT as above, INIT as a prefix
# folder: INIT=models gives models/synthmorph_affine and models/synthmorph_deform.
train-synthmorph: install
	$(MAKE) --no-print-directory train-synthmorph_affine $(if $(INIT),INIT=$(INIT)/synthmorph_affine)
	$(MAKE) --no-print-directory train-synthmorph_deform $(if $(INIT),INIT=$(INIT)/synthmorph_deform)

clean:
	rm -rf $(VENV) build *.egg-info python/*.egg-info .pytest_cache
