# fused_lora — set-up and the two everyday commands.
#
#   make check   the main job: install into .venv, then `fused-lora check` (parity of every
#                kernel against the float64 reference) and `fused-lora bench` (the benchmark;
#                on a machine without a CUDA GPU: the interpreter smoke run + the roofline model)
#   make test    install into .venv with the test extras, then run the test suite
#   make demo    fine-tune a small character-level model, fused vs PEFT LoRA side by side
#
# Torch is installed first, pinned (TORCH=...), so that the package's `torch>=2.4`
# is already met and pip never swaps in another build.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: check test demo install clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(STAMP)

check: $(STAMP)
	$(BIN)/fused-lora check
	$(BIN)/fused-lora bench

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/fused-lora demo

clean:
	rm -rf $(VENV) build *.egg-info
