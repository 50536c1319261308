# Set-up and everyday commands. Everything runs inside .venv (created on first use).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SHARED ?= ../shared
# CIFAR-10 in ImageFolder layout (make data extracts the offline copy from $(SHARED)/data)
DATA   ?= data/cifar10

# the reference's command-line names (METHOD.md): make cifar10.ERK.RigL DENSITY=0.1 DPNUM=100 ...
DENSITY ?= 0.1
DPNUM   ?= 100
LR      ?= 0.1
DECAY   ?= 0.6
BS      ?= 200
SEED    ?= 0
EPOCHS  ?= 250
MODEL   ?= resnet50
DECAY_EVERY ?= 30
# any further cigl-train options, e.g. EXTRA="--device cuda"
EXTRA  ?=

.PHONY: install demo test bench gpu-suite lint data clean repro-cpu repro-paper repro-gpu cifar10.ERK.RigL cifar10.ERK.Dense cifar100.ERK.RigL

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all,test]'
	touch $@

demo: install
	$(BIN)/python tools/demo.py --out runs/demo

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/sparse_overhead.py
	$(BIN)/python benchmarks/calibration.py
	$(BIN)/python benchmarks/export_size.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/sparse_inference.py
	$(BIN)/python benchmarks/distributed.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

data: $(DATA)/train

$(DATA)/train:
	mkdir -p $(dir $(DATA))
	tar -xJf $(SHARED)/data/cifar10-jpeg.tar.xz -C $(dir $(DATA))
	test -d $(DATA)/train

# CigL as the reference's command intends: RigL masks + random mask (DPNUM) + averaging from epoch BS
cifar10.ERK.RigL: install
	$(BIN)/cigl-train --dataset cifar10 --data-dir $(DATA) --model $(MODEL) --method rigl --sparse-init erk \
	  --density $(DENSITY) --dpnum $(DPNUM) --avg-start $(BS) --lr $(LR) --decay $(DECAY) \
	  --decay-every $(DECAY_EVERY) --warmup-epochs 5 --epochs $(EPOCHS) --batch-size 128 --wd 1e-4 \
	  --val-size 0 --seed $(SEED) --out runs/$@.d$(DENSITY).dp$(DPNUM).bs$(BS).s$(SEED) $(EXTRA)

cifar10.ERK.Dense: install
	$(BIN)/cigl-train --dataset cifar10 --data-dir $(DATA) --model $(MODEL) --method dense \
	  --lr $(LR) --decay $(DECAY) --decay-every $(DECAY_EVERY) --warmup-epochs 5 --epochs $(EPOCHS) \
	  --batch-size 128 --wd 1e-4 --val-size 0 --seed $(SEED) --out runs/$@.s$(SEED) $(EXTRA)

# CIFAR-100 needs an ImageFolder copy (train/ and test/ with 100 class folders) passed as DATA=
cifar100.ERK.RigL: install
	$(BIN)/cigl-train --dataset imagefolder --data-dir $(DATA) --model $(MODEL) --method rigl --sparse-init erk \
	  --density $(DENSITY) --dpnum $(DPNUM) --avg-start $(BS) --lr $(LR) --decay $(DECAY) \
	  --decay-every $(DECAY_EVERY) --warmup-epochs 5 --epochs $(EPOCHS) --batch-size 128 --wd 1e-4 \
	  --val-size 0 --seed $(SEED) --out runs/$@.d$(DENSITY).dp$(DPNUM).bs$(BS).s$(SEED) $(EXTRA)

# the CPU study (docs/results/): Dense vs RigL vs CigL (+ RigL+W-DP and RigL+MC-DP from the CigL runs) at
# density 0.1, 2 seeds, ResNet-20 on a 4,000-image CIFAR-10 subset, 30 epochs; two runs at a time, one
# thread each (about 45 minutes; `python tools/study.py run --densities 0.1 0.05` adds density 0.05)
repro-cpu: install data
	$(BIN)/python tools/study.py run --data-dir $(DATA) --runs runs/study
	$(BIN)/python tools/study.py report --runs runs/study --out docs/results

# the paper-scale configuration (needs a GPU): CIFAR ResNet-50 (MODEL=wrn22_2 for WRN-22-2), 250 epochs,
# all training images, the reference's recipe; one run at a time
repro-paper: install data
	$(BIN)/python tools/study.py run --paper --data-dir $(DATA) --model $(MODEL) --epochs $(EPOCHS) --jobs 1 \
	  --runs runs/paper-$(MODEL)
	$(BIN)/python tools/study.py report --runs runs/paper-$(MODEL) --out docs/results/paper-$(MODEL)

# the paper's WRN-22-2 CIFAR-10 protocol (reference recipe, 250 epochs, all training images): Dense, RigL
# and CigL (+ RigL+W-DP and RigL+MC-DP from the CigL runs) at sparsity 80/90/95%, one seed, all 7 runs packed
# onto one GPU. Restartable: finished runs are skipped, interrupted ones resume (SEED=1 ... for more seeds;
# MINUTES=7 stops them at a checkpoint after 7 minutes, e.g. before a lease ends).
repro-gpu: install data
	$(BIN)/python tools/study.py run --repro-gpu --data-dir $(DATA) --seeds $(SEED) $(if $(MINUTES),--minutes $(MINUTES))
	$(BIN)/python tools/study.py report --repro-gpu  # runs/paper-wrn22_2 -> docs/results/paper-wrn22_2, + paper_comparison.md

# on a lent GPU machine: the CUDA tests, the CUDA benchmark rows, epoch timings (benchmarks/results/gpu_suite.json)
gpu-suite: install data
	$(BIN)/python benchmarks/gpu_suite.py --data-dir $(DATA)

clean:
	rm -rf runs build *.egg-info .pytest_cache
