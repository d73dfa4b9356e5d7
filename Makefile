# fused_lora — set-up and the two everyday commands.
#
#   make check   the main job: install into .venv, then `fused-lora check` (parity of every
#                kernel against the float64 reference) and `fused-lora bench` (the benchmark;
#                on a machine without a CUDA GPU: the interpreter smoke run + the roofline model)
#   make test    install into .venv with the test extras (and Triton 3.6, our GPU machine's,
#                in .venv/gpu-triton for the compile checks), then run the test suite
#   make demo    fine-tune a small character-level model, fused vs PEFT LoRA side by side
#   make compile-report
#                compile every kernel for sm_90 on every tile it may run with, with the newest
#                Triton and with the GPU machine's (the tests compile each code path once, at
#                its largest rank tile: less), then --check-known with each; 33 to 37
#                minutes on two cores: run it when kernels/ changes
#   make test-gpu-stack
#                the suite (less the compile checks) under the interpreter with our GPU
#                machine's Python, torch and Triton (3.12, 2.11, 3.6): what bench/gpu_check.sh
#                will import there, checked on a CPU; optional (torch 2.11 from PyPI is a
#                CUDA build, about 4.6 GB in .venv-gpu-stack/)
#   make test-stack STACK_TORCH=2.9.1 STACK_TRITON=3.5.1
#                the same with any other torch/Triton pair, in .venv-stack-<torch>/ (optional,
#                about 7 GB each); make test-floor-stack: the oldest pyproject.toml allows (2.8, 3.4)
#
# Torch is installed first, pinned (TORCH=...), so that the package's `torch>=2.8`
# is already met and pip never swaps in another build.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The Triton of our H200 test machine (../shared/design/GPU.md), installed
# beside the newest one: the tests also compile every kernel for sm_90 and run
# the parity check with it (numpy < 2.4: its interpreter needs the older numpy).
GPU_TRITON     ?= triton==3.6.0
GPU_TRITON_DIR := $(VENV)/gpu-triton
GPU_STAMP      := $(GPU_TRITON_DIR)/.installed

.PHONY: check test demo install clean compile-report test-gpu-stack test-floor-stack test-stack

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

$(GPU_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(GPU_TRITON_DIR) "$(GPU_TRITON)" "numpy<2.4"
	touch $@

install: $(STAMP) $(GPU_STAMP)

check: $(STAMP)
	$(BIN)/fused-lora check
	$(BIN)/fused-lora bench

test: $(STAMP) $(GPU_STAMP)
	FUSED_LORA_GPU_TRITON=$(abspath $(GPU_TRITON_DIR)) $(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/fused-lora demo

# The sm_90 compile reports of every tile (--scope tiles), with each Triton; either's problems fail it.
compile-report: $(STAMP) $(GPU_STAMP)
	$(BIN)/python -m fused_lora.compile_report --arch 90 --scope tiles
	PYTHONPATH=$(abspath $(GPU_TRITON_DIR)) $(BIN)/python -m fused_lora.compile_report --arch 90 --scope tiles
	$(BIN)/python -m fused_lora.compile_report --check-known
	PYTHONPATH=$(abspath $(GPU_TRITON_DIR)) $(BIN)/python -m fused_lora.compile_report --check-known

# Our H200 machine's versions (../shared/design/GPU.md): Python 3.12 where a working python3.12
# is on the PATH (else $(PYTHON); GPU_STACK_PYTHON=... to choose), torch 2.11, Triton 3.6.
GPU_STACK_PYTHON ?= $(shell python3.12 -c '' >/dev/null 2>&1 && echo python3.12 || echo $(PYTHON))
GPU_STACK_VENV   ?= .venv-gpu-stack
GPU_STACK_TORCH  ?= torch==2.11.0
GPU_STACK_PINS   ?=
GPU_STACK_STAMP  := $(GPU_STACK_VENV)/.installed

$(GPU_STACK_STAMP): pyproject.toml setup.py
	$(GPU_STACK_PYTHON) -m venv $(GPU_STACK_VENV)
	$(GPU_STACK_VENV)/bin/python -m pip install --quiet "$(GPU_STACK_TORCH)" "$(GPU_TRITON)" "numpy<2.4" $(GPU_STACK_PINS)
	$(GPU_STACK_VENV)/bin/python -m pip install --quiet -e ".[test]" "$(GPU_TRITON)" "numpy<2.4" $(GPU_STACK_PINS)
	touch $@

test-gpu-stack: $(GPU_STACK_STAMP)
	$(GPU_STACK_VENV)/bin/python -c 'import platform, torch, triton; print("python", platform.python_version(), "| torch", torch.__version__, "| triton", triton.__version__)'
	TRITON_INTERPRET=1 $(GPU_STACK_VENV)/bin/python -m pytest --ignore=tests/test_compile_report.py --ignore=tests/test_gpu_triton.py

# Any torch/Triton pair, in .venv-stack-<torch>/ (those between the floor and the GPU machine's:
# torch 2.9.1 with Triton 3.5.1, torch 2.10.0 with 3.6.0). torchao pinned to one that imports there
# (transformers imports it) and that PEFT takes: 0.17 imports on torch 2.8 to 2.10; 0.18 needs 2.10 or newer.
STACK_TORCH  ?=
STACK_TRITON ?=
STACK_PINS   ?= torchao==0.17.0

test-stack:
	@test -n "$(STACK_TORCH)" -a -n "$(STACK_TRITON)" || { echo "make test-stack STACK_TORCH=<version> STACK_TRITON=<version>" >&2; exit 2; }
	$(MAKE) test-gpu-stack GPU_STACK_VENV=.venv-stack-$(STACK_TORCH) GPU_STACK_PYTHON=$(PYTHON) \
		GPU_STACK_TORCH=torch==$(STACK_TORCH) GPU_TRITON=triton==$(STACK_TRITON) GPU_STACK_PINS="$(STACK_PINS)"

# The oldest versions pyproject.toml allows: torch>=2.8 (which brings Triton 3.4), triton>=3.4.
test-floor-stack:
	$(MAKE) test-stack STACK_TORCH=2.8.0 STACK_TRITON=3.4.0

clean:
	rm -rf $(VENV) $(GPU_STACK_VENV) .venv-stack-* build *.egg-info
