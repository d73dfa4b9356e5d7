"""fused_lora: LoRA linear layers whose frozen base GEMM and low-rank update
run as one fused Triton kernel, forward and backward.

The math is in :mod:`fused_lora.ops`; the kernels in :mod:`fused_lora.kernels`.
"""

from . import _triton, dispatch, reference
from .dispatch import explain
from .dropout import dropout_mask
from .integration import (
    AdapterFileError,
    ConversionReport,
    adapter_ids,
    adapter_parameters,
    disable_adapters,
    download_adapter,
    from_peft,
    inject,
    inject_multi,
    load_adapter,
    load_adapters,
    merge_and_unload,
    push_adapter,
    rescale_adapters,
    save_adapter,
    to_peft,
    unload,
)
from .layer import LoRALinear, MultiLoRALinear
from .ops import LoRALinearFunction, dora_linear, lora_linear, multi_lora_linear
from .quant import dequantize_4bit, dequantize_int8, dequantize_nf4, quantize_fp4, quantize_int8, quantize_nf4

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "ConversionReport",
    "LoRALinear",
    "LoRALinearFunction",
    "MultiLoRALinear",
    "adapter_ids",
    "adapter_parameters",
    "disable_adapters",
    "dispatch",
    "download_adapter",
    "dequantize_4bit",
    "dequantize_int8",
    "dequantize_nf4",
    "dora_linear",
    "dropout_mask",
    "explain",
    "from_peft",
    "inject",
    "inject_multi",
    "load_adapter",
    "load_adapters",
    "lora_linear",
    "merge_and_unload",
    "multi_lora_linear",
    "push_adapter",
    "quantize_fp4",
    "quantize_int8",
    "quantize_nf4",
    "reference",
    "rescale_adapters",
    "save_adapter",
    "to_peft",
    "unload",
]
