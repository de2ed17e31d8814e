# Two commands set up a fresh machine:  `make demo`  and  `make test`.
# Every target is idempotent: the venv, the install and the demo data are made once.

PYTHON ?= python3
VENV   ?= .venv
# CUDA: the CUDA major version of torch in the venv; pick it by the NVIDIA driver (`nvidia-smi`
# prints "CUDA Version: X.Y", the newest it runs; CPU-only hosts: either).
#   13 (default): torch from the package index (its CUDA 13 build). Needs an R580 or newer driver.
#   12: torch from PyTorch's CUDA 12.6 index and DALI's cuda120 build, for R525-R575 drivers:
#       make install CUDA=12
# DALI: cuda12 (nvidia-dali-cuda120) unless CUDA=13 or DALI=cuda13 is given. The CUDA 12 build
# runs on every driver from R525 up (an R580 driver runs CUDA 12 code) and is the build this
# project's CPU machines and CI are checked with; `make install CUDA=13` (or DALI=cuda13) puts
# one CUDA generation in the process (torch cu13 + DALI cuda130), as on the GPU test host.
# `python -m fastdeit.doctor` (run by every make install) prints the builds and the driver and
# stops with the fix when nvidia-smi lists a GPU that torch or DALI cannot use.
# The choice is remembered in the venv's stamp: after `make install CUDA=12`, `make test` and
# `make demo` keep CUDA 12 until another CUDA= is given.
_SAVED := $(subst -, ,$(patsubst $(VENV)/.installed-%,%,$(firstword $(wildcard $(VENV)/.installed-cu1*))))
ifeq ($(origin CUDA),undefined)
CUDA   := $(or $(patsubst cu%,%,$(word 1,$(_SAVED))),13)
_DALI  := $(or $(word 2,$(_SAVED)),cuda12)
else
_DALI  := cuda$(CUDA)
endif
ifeq ($(filter $(CUDA),12 13),)
$(error CUDA must be 12 or 13, got '$(CUDA)')
endif
DALI   ?= $(_DALI)
OTHER_DALI  := $(if $(filter $(DALI),cuda12),nvidia-dali-cuda130,nvidia-dali-cuda120)
TORCH_INDEX := $(if $(filter $(CUDA),12),--index-url https://download.pytorch.org/whl/cu126,)
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-cu$(CUDA)-$(DALI)

# DeepSpeed on every available device: all GPUs, else 2 CPU ranks over gloo.
GPUS   := $(shell nvidia-smi -L 2>/dev/null | grep -c GPU)
ifeq ($(GPUS),0)
LAUNCH := DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus 2
else
LAUNCH := $(VENV)/bin/deepspeed
endif

DEMO_DATA := data/demo
DEMO_RUNS := runs/demo

.PHONY: install data demo finetune-demo test clean-demo

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Switching CUDA or DALI in an existing venv: the other DALI build goes first (both install
# the same nvidia.dali package), and a torch built for the other CUDA major is replaced (pip
# would keep it: its version satisfies the requirement). A CPU-only torch is left alone.
$(STAMP): setup.py | $(PY)
	rm -f $(VENV)/.installed-*
	$(PY) -m pip uninstall -y -q $(OTHER_DALI) 2>/dev/null || true
	@have=$$($(PY) -c "import torch; print((torch.version.cuda or '').split('.')[0])" 2>/dev/null); \
	if [ -n "$$have" ] && [ "$$have" != "$(CUDA)" ]; then \
		echo "replacing torch's CUDA $$have build by a CUDA $(CUDA) one"; \
		$(PY) -m pip uninstall -y -q torch torchvision; fi
	$(PY) -m pip install -q $(TORCH_INDEX) torch torchvision
	$(PY) -m pip install -q -e ".[$(DALI),dev]"
	touch $@

install: $(STAMP)
	$(PY) -m fastdeit.doctor

$(DEMO_DATA)/.complete: | $(STAMP)
	$(PY) -m fastdeit.data.synthetic --out $(DEMO_DATA) --classes 10 --train-per-class 120 \
		--val-per-class 30 --min-size 56 --max-size 96 --seed 0 --difficulty 0.5
	touch $@

data: $(DEMO_DATA)/.complete

# Teacher CNN first, then the distilled DeiT student learning from its exported weights.
demo: install data
	rm -rf $(DEMO_RUNS)
	$(LAUNCH) launch/train.py --config configs/demo_teacher.yaml trainer.run_dir=$(DEMO_RUNS)/teacher
	$(LAUNCH) launch/train.py --config configs/demo_student.yaml trainer.run_dir=$(DEMO_RUNS)/student \
		teacher.weights=$(DEMO_RUNS)/teacher/model.pth
	$(PY) launch/summary.py $(DEMO_RUNS)/teacher $(DEMO_RUNS)/student

# Fine-tuning a pretrained demo DeiT on a new generated task vs training it from scratch, 3 seeds
# (benchmarks/finetune.py; writes benchmarks/results/<date>-finetune-vs-scratch.md). Pretrains a
# teacher-free demo student first unless PRETRAINED= names weights (e.g. runs/demo/student).
PRETRAINED ?=
finetune-demo: install data
	DS_ACCELERATOR=cpu $(PY) -m benchmarks.finetune --seeds 0 1 2 $(if $(PRETRAINED),--pretrained $(PRETRAINED),)

test: install
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -rs --durations=15 tests

clean-demo:
	rm -rf $(DEMO_RUNS) $(DEMO_DATA)
