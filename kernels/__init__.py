"""Triton kernels of fused_lora (installed as ``fused_lora.kernels``).

* :mod:`.gemm` — the fused GEMM (forward, dx and dW are one body with roles swapped);
* :mod:`.skinny` — the memory-bound pass over one wide operand (shrink, the dy
  pass of the backward, dA) and the deterministic reduction of its partials;
* :mod:`.dora` — DoRA's weight norm ``‖W + s·B A‖`` in one read of W;
* :mod:`.dequant` — a quantized base (int8, NF4) made whole, for large M;
* :mod:`.configs` — every launch configuration;
* :mod:`.common` — the dropout keep-mask and the interpreter switches.

The math is written once, in :mod:`fused_lora.ops`. The launchers launch on
the current CUDA device, as Triton does; :mod:`fused_lora.ops` makes the
operands' GPU current first.
"""

if __name__ == "kernels":
    # Imported as a top-level ``kernels`` (a checkout's root on sys.path, and a
    # probe for the unrelated ``kernels`` package on PyPI, as transformers
    # makes): stay an empty shell with no version, so the probe finds nothing
    # usable and no second copy of the kernels is built.
    __all__ = []
else:
    from . import configs
    from .common import is_interpreted, poison_outputs
    from .dequant import dequantize_kernel, dequantize_weight
    from .dora import dora_norm, dora_norm_kernel
    from .gemm import lora_gemm, lora_gemm_kernel, tma_available
    from .skinny import lora_skinny_kernel, reduce_all, reduce_partials, reduce_partials_kernel, skinny_pass

    #: True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
    INTERPRETER = is_interpreted(lora_gemm_kernel)

    __all__ = [
        "INTERPRETER",
        "configs",
        "dequantize_kernel",
        "dequantize_weight",
        "dora_norm",
        "dora_norm_kernel",
        "lora_gemm",
        "lora_gemm_kernel",
        "lora_skinny_kernel",
        "poison_outputs",
        "reduce_all",
        "reduce_partials",
        "reduce_partials_kernel",
        "skinny_pass",
        "tma_available",
    ]
