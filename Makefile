# make help: list the targets
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.setup-stamp
ARGS    ?=
# llama.cpp without its examples, tests and multimodal tools: what the GGUF checks need, built faster
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

.PHONY: help setup train test test-gpu lint bench sass report clean

help: ## this list
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first: on the dev machines torch==2.13.0 is a local CPU build; nothing after it upgrades torch
	$(PIP) install -q torch==2.13.0 || $(PIP) install -q torch
	@echo "[setup] installing the project; llama-cpp-python compiles llama.cpp from source the first time (about 5 min on 2 cores)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## create .venv with torch (CPU) and the project

train: setup ## set up, fetch the embedded default model + corpus, run the headline job
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) train.py method=pbllm_qat salient_ratio=0.1 $(ARGS)

test: setup ## set up, run the tests (CPU; GPU tests skip without a GPU)
	WANDB_MODE=disabled $(PY) -m pytest -q $(ARGS)

test-gpu: ## the kernel tests on a GPU machine (torch only)
	python3 -m pytest -q tests/test_kernels.py

report: setup ## markdown table + Pareto plot (PNG) of run folders: make report RUNS="outputs/x multirun/y" [PLOT=pareto.png]
	$(PY) -m qat.eval.report $(RUNS) --plot $(or $(PLOT),pareto.png)

lint: setup ## ruff
	$(PY) -m ruff check qat tests train.py eval.py benchmarks

bench: ## the kernel benchmark (needs a GPU): benchmarks/results/*.json
	python3 benchmarks/bitgemm.py

sass: setup ## static instruction counts of the GEMV kernels' loops (nvcc; no GPU)
	$(PIP) install -q nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
	$(PY) benchmarks/sass_loops.py

clean: ## remove run outputs (not the model cache in ~/.cache/qat)
	rm -rf outputs multirun wandb lightning_logs .pytest_cache
