"""Triton kernels of fused_lora (installed as ``fused_lora.kernels``).

* :mod:`.gemm` — the fused GEMM (forward, dx and dW are one body with roles swapped);
* :mod:`.skinny` — the memory-bound pass over one wide operand (shrink, the dy
  pass of the backward, dA) and the deterministic reduction of its partials;
* :mod:`.dora` — DoRA's weight norm ``‖W + s·B A‖`` in one read of W;
* :mod:`.dequant` — a quantized base (int8, NF4) made whole, for large M;
* :mod:`.mask` — the dropout keep-mask written out (the ``cublas`` strategy's, with dropout);
* :mod:`.configs` — every launch configuration;
* :mod:`.launch` — the launch cache (less host time a launch; the default since run 5 timed it);
* :mod:`.common` — the dropout keep-mask and the interpreter switches.

The math is written once, in :mod:`fused_lora.ops`. The launchers launch on
the current CUDA device, as Triton does; :mod:`fused_lora.ops` makes the
operands' GPU current first.
"""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: a checkout's root on sys.path (``python
    # -m pytest`` from it, PYTHONPATH=.) shadows the unrelated ``kernels``
    # package on PyPI (Hugging Face's kernel hub), which transformers (5.25 on,
    # a dependency) and bitsandbytes import. Where that package is installed,
    # this module hands the import over to it (``import`` returns what
    # sys.modules holds once this module has run); where it is not, it stays an
    # empty shell with no version, so a probe finds nothing usable. Either way
    # no second copy of these kernels is built.
    def _hand_over_to_the_installed_kernels() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        elsewhere = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != checkout]
        spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
        if spec is None or spec.loader is None:
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules["kernels"] = sys.modules.get(__name__) or module
            raise

    __all__ = []
    _hand_over_to_the_installed_kernels()
else:
    from . import configs, launch
    from .common import is_interpreted, poison_outputs
    from .dequant import dequantize_kernel, dequantize_weight
    from .dora import dora_norm, dora_norm_kernel, dora_norms
    from .gemm import lora_gemm, lora_gemm_kernel, tma_available, tma_readable
    from .mask import keep_mask_kernel, keep_mask_tensor
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
        "dora_norms",
        "keep_mask_kernel",
        "keep_mask_tensor",
        "launch",
        "lora_gemm",
        "lora_gemm_kernel",
        "lora_skinny_kernel",
        "poison_outputs",
        "reduce_all",
        "reduce_partials",
        "reduce_partials_kernel",
        "skinny_pass",
        "tma_available",
        "tma_readable",
    ]
