# Two commands a newcomer needs: `make run` and `make test`. Both create .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
RUN_DIR ?= runs/flip-ml-1m
# torch is pinned here (pyproject.toml keeps a range for users). Which build pip installs depends
# on the index: from the public one on Linux it is the CUDA build; TORCH_INDEX=URL (e.g.
# https://download.pytorch.org/whl/cpu) takes it from there instead.
TORCH   := torch==2.13.0
TORCH_INDEX ?=

.PHONY: run test venv clean gpu-pack

$(BIN)/flipctr: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/flipctr

# FLIP on MovieLens-1M with the `cpu` profile (`gpu` where CUDA is present): pretraining, then DCNv2 from scratch, FLIP_ID,
# FLIP_PLM and FLIP (about half an hour on 2 cores); results in $(RUN_DIR)/results.md
run: venv
	$(BIN)/flipctr data get ml-1m --source auto
	$(BIN)/flipctr lm get minilm-l6
	$(BIN)/flipctr run --dataset ml-1m --profile auto --run-dir $(RUN_DIR)

# What an offline GPU machine needs for the `gpu` profile (< 60 MiB): the raw data of
# $(PACK_DATASET) (ml-1m, or bookcrossing: 58.4 MiB), MiniLM-L6 in bf16.
# There: bash benchmarks/gpu/oneshot.sh gpu-pack OUT_DIR (README, "On a GPU machine without internet")
PACK_DATASET ?= ml-1m
gpu-pack: venv
	$(BIN)/flipctr data get $(PACK_DATASET) --source auto
	$(BIN)/flipctr lm get minilm-l6
	$(BIN)/python benchmarks/gpu/pack.py gpu-pack --dataset $(PACK_DATASET)

test: venv
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) build src/*.egg-info
