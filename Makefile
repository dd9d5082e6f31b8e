# make help: list the targets
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.setup-stamp
ARGS    ?=
# llama.cpp without its examples, tests and multimodal tools: what the GGUF checks need, built faster;
# on x86 without its AMX matmul, which segfaults on Q4_0 / Q4_1 layers on Sapphire Rapids-class CPUs
# (llama.cpp issue 20824): the AVX-512 kernels run there instead. The rest of the build is -march=native.
NO_AMX  := $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8)
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $(NO_AMX)

.PHONY: help setup train test test-gpu lint bench sass report clean

help: ## this list
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first: on the dev machines torch==2.13.0 is a local CPU build; nothing after it upgrades torch
	$(PIP) install -q torch==2.13.0 || $(PIP) install -q torch
	@echo "[setup] llama-cpp-python compiles llama.cpp from source for this CPU (5-7.5 min on 2 cores)"
	# not from pip's wheel cache: a wheel built elsewhere has another CPU's -march=native and flags
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q --no-cache-dir "$$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)"
	$(PIP) install -q -e '.[dev]'
	@echo "[setup] building the CPU kernels (C++, ~1 min on 2 cores: the packed layers and QAT's fake quantization use them)"
	$(PY) -c "from qat.kernels.build import cpu_extension_or_none; cpu_extension_or_none()"
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
