# The README's two commands: `make demo` (the default experiment, end to end) and `make test`.
# Both first install what is missing into .venv. torch/torchvision are installed by exact version
# first: that pair lies on this machine's disk, so pip never resolves a multi-GB download.
PYTHON := .venv/bin/python
STAMP := .venv/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
VAE_WEIGHTS := models/demo/vae.safetensors
export HF_HUB_OFFLINE ?= 1
# On a shared CPU, OpenMP threads that busy-wait for each other stall when other processes hold the
# cores (measured here: 22.7 s vs 0.54 s per demo U-Net step under load); passive waiting avoids it.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test gpu-check gpu-wheels

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install -q -e '.[dev]'
	rm -f .venv/.installed-*
	touch $@

demo: $(STAMP)
	test -f $(VAE_WEIGHTS) || $(PYTHON) train.py experiment=demo_vae
	$(PYTHON) train.py experiment=demo
	$(PYTHON) benchmarks/prompt_adherence.py

test: $(STAMP)
	WANDB_MODE=offline $(PYTHON) -m pytest

# One prepared run of everything a GPU should prove (benchmarks/gpu_check.py); DRY_RUN=1: the same on the CPU,
# tiny sizes. It runs on the GPU machine's own Python, with what .whl/ adds (make gpu-wheels fetches those).
GPU_CHECK_PYTHON ?= $(if $(wildcard $(PYTHON)),$(PYTHON),python3)
gpu-check:
	$(GPU_CHECK_PYTHON) benchmarks/gpu_check.py $(if $(DRY_RUN),--dry-run) $(GPU_CHECK_ARGS)

gpu-wheels:
	$(PYTHON) benchmarks/gpu_wheels.py
