# `make demo` and `make test` each set everything up on a fresh clone, then run.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
MRMAE  := $(VENV)/bin/mrmae
STAMP  := $(VENV)/.installed
DEMO   := demo

.PHONY: install test demo bench fidelity clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned: these wheels lie on the build machine's disk.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q --durations=25 tests

# Starts over: the demo's data and runs are rebuilt (runs are never overwritten, so the folder goes first).
demo: $(STAMP)
	rm -rf $(DEMO)
	$(MRMAE) make-demo-shards --out $(DEMO)/shards --num-images 48 --shard-size 16 --seed 0
	$(MRMAE) extract-features --shards "$(DEMO)/shards/demo-{000000..000002}.tar" \
	    --feature-cache $(DEMO)/cache --teacher clip:ViT-S-16 --views 2 --dtype int8 --batch-size 16 --seed 0
	$(MRMAE) cache info --feature-cache $(DEMO)/cache
	$(MRMAE) cache verify --feature-cache $(DEMO)/cache --recompute 4
	$(MRMAE) pretrain --shards "$(DEMO)/shards/demo-{000000..000002}.tar" --feature-cache $(DEMO)/cache \
	    --model mrmae_vit_tiny_patch16 --decoder-depth 2 --decoder-dim 128 --epochs 3 --batch-size 16 \
	    --lr 1e-3 --warmup-epochs 1 --mask focused --out $(DEMO)/run
	$(MRMAE) visualize --feature-cache $(DEMO)/cache --shards "$(DEMO)/shards/demo-000000.tar" \
	    --checkpoint $(DEMO)/run --num 4 --out $(DEMO)/run
	@echo "mrmae is installed in $(VENV): run 'source $(VENV)/bin/activate' to put it on PATH in this or a new shell"

# Every CPU benchmark at settings that take about 7 minutes on 2 idle cores (each prints its ratio
# table and writes benchmarks/results/<name>.json); BENCHMARKS.md's tables used the scripts' larger
# defaults. benchmarks/gpu_bench.py needs a CUDA card and is not run here.
bench: $(STAMP)
	$(PY) benchmarks/extract_throughput.py --images 32 --reps 3
	$(PY) benchmarks/codecs.py --reps 3
	$(PY) benchmarks/wds_codec.py --reps 3
	$(PY) benchmarks/pretrain_throughput.py --warmup 1 --steps 3 --step-only-warmup 1 --step-only-steps 3
	$(PY) benchmarks/loader_throughput.py
	$(PY) benchmarks/loader_render_split.py --images 128 --shard-size 128 --reps 2 --budget 5
	$(PY) benchmarks/loader_latency.py --images 512 --shard-size 128 --reps 1 --budget 2
	$(PY) benchmarks/extract_upload.py --reps 1 --images 16 --shard-size 8
	$(PY) benchmarks/goals.py

# MAE vs MR-MAE frozen-feature accuracy on scikit-learn's digits (BENCHMARKS.md, "Fidelity (toy scale)"):
# a teacher, a cache, 15 pretraining runs (the fused ConvViT row included), each probed and fine-tuned
# for 2 epochs: over an hour on 2 cores, so not part of `bench`.
# scikit-learn is needed by this benchmark only, not by the package.
fidelity: $(STAMP)
	$(PY) -m pip install -q scikit-learn
	$(PY) benchmarks/fidelity.py --finetune-epochs 2

clean:
	rm -rf $(DEMO) build *.egg-info
