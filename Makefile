# tensorpoly: every entry point. `make help` lists them.
PY      := .venv/bin/python
STAMP   := .venv/.installed
MODEL   ?=
BACKBONE ?= t0_3b
N_TASKS ?= 313
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: help setup test test-slow params data benchmark backbone train eval finetune sweep bench bench-memory tables reproduce

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: $(STAMP)  ## create .venv and install the pinned requirements (first use only)

$(STAMP): requirements.txt pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q -U pip
	.venv/bin/pip install -q -r requirements.txt
	# promptsource pins an old stack and claims python<3.10: install it alone, without its dependencies
	.venv/bin/pip install -q --no-deps --ignore-requires-python promptsource==0.2.3
	.venv/bin/pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)  ## run the test suite (CPU, under 10 minutes)
	$(PY) -m pytest -q

test-slow: $(STAMP)  ## run only the slow checks
	$(PY) -m pytest -q -m slow

params: $(STAMP)  ## parameter report: make params [MODEL=tensorpoly1] [BACKBONE=t0_3b] [N_TASKS=313] (every type by default)
	$(PY) scripts/param_report.py --model $(or $(MODEL),all) --backbone $(BACKBONE) --n-tasks $(N_TASKS)

data: $(STAMP)  ## T0 data into data/t0/ where the hub is reachable (ARGS="--storycloze-dir DIR --few-shot-dir DIR")
	$(PY) scripts/prepare_data.py $(ARGS)

benchmark: $(STAMP)  ## regenerate the embedded benchmark under data/benchmark/ (seeded, seconds)
	$(PY) scripts/build_benchmark.py

backbone: $(STAMP)  ## re-pretrain the embedded backbone data/backbone/ (about 12 minutes on one CPU thread)
	$(PY) scripts/pretrain_backbone.py

train: $(STAMP)  ## multi-task training + zero-shot held-out eval: make train [MODEL=tensorpoly1] [ARGS="seed=1 train.steps=500"]
	$(PY) scripts/train.py $(if $(MODEL),model=$(MODEL)) $(ARGS)

eval: $(STAMP)  ## zero-shot eval of a trained adapter: make eval [CKPT=outputs/train/<run>] (newest run by default)
	$(PY) scripts/evaluate.py $(if $(CKPT),checkpoint=$(CKPT)) $(ARGS)

finetune: $(STAMP)  ## few-shot fine-tuning (T-Few recipe) on the held-out tasks: make finetune [CKPT=...] [ARGS=...]
	$(PY) scripts/finetune.py $(if $(CKPT),checkpoint=$(CKPT)) $(ARGS)

MODELS ?= lora,tlora,poly,mhr,tensorpoly1,tensorpoly2
SEEDS  ?= 42,1024,0
sweep: $(STAMP)  ## Hydra multirun over models and seeds: make sweep [MODELS=lora,tensorpoly1] [SEEDS=42,1024,0]
	$(PY) scripts/train.py -m model=$(MODELS) seed=$(SEEDS) $(ARGS)

bench: $(STAMP)  ## adapter speed/memory side by side: make bench [ARGS="--preset cpu"]
	$(PY) scripts/bench_adapters.py $(ARGS)

bench-memory: $(STAMP)  ## peak memory on the gpu preset's T5-XL shapes, from small depths on this CPU: [ARGS="--layers 1,2,3"]
	$(PY) scripts/bench_memory.py $(ARGS)

tables: $(STAMP)  ## the paper's tables (results/tables/) and plots (results/plots/) from every results file under results/
	$(PY) scripts/make_tables.py

reproduce: $(STAMP)  ## scaled-down reproduction on CPU: 6 methods x 3 seeds, zero- and few-shot (results/reproduce/)
	$(PY) scripts/reproduce.py $(ARGS)
