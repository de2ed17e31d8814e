# Two commands set up a fresh machine:  `make demo`  and  `make test`.
# Every target is idempotent: the venv, the install and the demo data are made once.

PYTHON ?= python3
VENV   ?= .venv
# DALI build: cuda12 (also fine on CPU-only hosts) or cuda13 for CUDA 13 drivers.
DALI   ?= cuda12
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(DALI)

# DeepSpeed on every available device: all GPUs, else 2 CPU ranks over gloo.
GPUS   := $(shell nvidia-smi -L 2>/dev/null | grep -c GPU)
ifeq ($(GPUS),0)
LAUNCH := DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus 2
else
LAUNCH := $(VENV)/bin/deepspeed
endif

DEMO_DATA := data/demo
DEMO_RUNS := runs/demo

.PHONY: install data demo test clean-demo

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): setup.py | $(PY)
	$(PY) -m pip install -q -e ".[$(DALI),dev]"
	touch $@

install: $(STAMP)

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

test: install
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -rs tests

clean-demo:
	rm -rf $(DEMO_RUNS) $(DEMO_DATA)
