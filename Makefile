# The README's two commands: `make demo` (the default experiment, end to end) and `make test`.
# Both first install what is missing into .venv: the demo what the project needs, the tests also its dev
# extras (diffusers, notebooks, pytest). torch/torchvision are installed by exact version first: that pair
# lies on this machine's disk, so pip never resolves a multi-GB download. pip does not byte-compile the
# installed files (--no-compile): Python compiles the modules a run imports when it first imports them,
# a fraction of what pip would compile.
PYTHON := .venv/bin/python
STAMP := .venv/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEV_STAMP := $(STAMP)-dev
PIP_INSTALL := $(PYTHON) -m pip install -q --no-compile
VAE_WEIGHTS := models/demo/vae.safetensors
# The built-in set's VAE posteriors and text states, computed once (configs/data/demo_latents.yaml reads them).
DEMO_LATENTS := data/demo-latents
export HF_HUB_OFFLINE ?= 1
# OpenMP threads that busy-wait for each other stall when other processes hold the cores (measured here:
# 22.7 s vs 0.54 s per demo U-Net step under load), so `make test`, whose tests run training processes
# beside each other, waits passively. `make demo` runs alone and keeps libgomp's default (spin briefly,
# then sleep): passive waiting slowed its step (benchmarks/train_step.py, demo_step).
test: export OMP_WAIT_POLICY ?= PASSIVE
# glibc serves allocations above its mmap threshold (adaptive, from 128 KiB) with fresh mappings and trims
# the heap's free top, so the demo's megabyte-sized activations could be page-faulted anew at every step; a
# fixed 32 MiB mmap threshold and a 256 MiB trim threshold keep them in the heap (benchmarks/train_step.py).
demo: export GLIBC_TUNABLES ?= glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456

.PHONY: install demo test gpu-check gpu-wheels

install: $(DEV_STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv .venv
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) torch==2.14.1 torchvision==0.29.1
	$(PIP_INSTALL) -e .
	rm -f .venv/.installed-*
	touch $@

$(DEV_STAMP): $(STAMP)
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

demo: $(STAMP) $(DEMO_LATENTS)/.complete
	$(PYTHON) train.py experiment=demo data=demo_latents data.num_workers=0
	$(PYTHON) benchmarks/prompt_adherence.py --sampler dpmpp_2m --steps 10

$(VAE_WEIGHTS): | $(STAMP)
	$(PYTHON) train.py experiment=demo_vae

# Made again whenever the VAE weights are newer (a retrained stage 1 gives other latents).
$(DEMO_LATENTS)/.complete: $(VAE_WEIGHTS)
	rm -rf $(DEMO_LATENTS)
	$(PYTHON) -m ldm.tools.precompute_latents --builtin data --out-dir $(DEMO_LATENTS) --resolution 32 \
	    --vae configs/model/vae/tiny.yaml --vae-weights $(VAE_WEIGHTS) --text-encoder configs/model/text_encoder/tiny.yaml
	touch $@

# One pytest-xdist worker per core, each with one thread (tests/conftest.py); tests that share what a fixture
# built run on one worker (--dist loadgroup); the 25 slowest tests are listed at the end (docs/testing.md).
# TEST_WORKERS=0: one process; PYTEST_ARGS: files, -k or -m selections, other pytest options.
TEST_WORKERS ?= auto
PYTEST_ARGS ?=
test: $(DEV_STAMP)
	WANDB_MODE=offline $(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=25 $(PYTEST_ARGS)

# One prepared run of everything a GPU should prove (benchmarks/gpu_check.py); DRY_RUN=1: the same on the CPU,
# tiny sizes. It runs on the GPU machine's own Python, with what .whl/ adds (make gpu-wheels fetches those).
GPU_CHECK_PYTHON ?= $(if $(wildcard $(PYTHON)),$(PYTHON),python3)
gpu-check:
	$(GPU_CHECK_PYTHON) benchmarks/gpu_check.py $(if $(DRY_RUN),--dry-run) $(GPU_CHECK_ARGS)

gpu-wheels:
	$(PYTHON) benchmarks/gpu_wheels.py
