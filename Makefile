# fused_lora — set-up and the two everyday commands.
#
#   make check   the main job: install into .venv, then `fused-lora check` (parity of every
#                kernel against the float64 reference) and `fused-lora bench` (the benchmark;
#                on a machine without a CUDA GPU: the interpreter smoke run + the roofline model)
#   make test    install into .venv with the test extras (and Triton 3.6, our GPU machine's,
#                in .venv/gpu-triton for the compile checks), then run the test suite
#   make demo    fine-tune a small character-level model, fused vs PEFT LoRA side by side
#
# Torch is installed first, pinned (TORCH=...), so that the package's `torch>=2.4`
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

.PHONY: check test demo install clean

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

clean:
	rm -rf $(VENV) build *.egg-info
