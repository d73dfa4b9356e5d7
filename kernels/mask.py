"""The keep-mask pass: the dropout keep-mask of an (M, K) matrix, written
out as bytes (one a element, 1 kept, 0 dropped), the very mask every other
pass regenerates from the seed in registers
(:func:`fused_lora.kernels.common.keep_mask`).

Only the ``cublas`` strategy stores a mask: its products are cuBLAS's,
which cannot draw one, so this pass draws it once and PyTorch multiplies x
by it (``x ⊙ keep``, what ``drop(x)`` is less its ``1 / (1 - p)``, which
moves into the scale of the low-rank term). Eager calls run that strategy
where the host's time decides a step
(:func:`fused_lora.dispatch.eager_cublas_reason`): at small M autograd keeps
the mask for its backward, above that the autograd Function's backward
draws it again (:func:`fused_lora.dispatch.eager_records`).
"""

from __future__ import annotations

import types

import torch
import triton
import triton.language as tl

from .common import alloc, keep_mask, load_seed, mask_counters_int64, seed_arg
from .configs import KEEP_MASK, cdiv
from .launch import launch


# (M and the seed not specialised: the token count changes between batches, and a seed's value is no
# constant; K is, as Triton does by default: the mask's column tail)
@triton.jit(do_not_specialize=["M", "seed"])
def keep_mask_kernel(
    out_ptr,  # (M, K) uint8: 1 where kept
    M, K,
    stride_om,  # (the column stride is 1)
    p, seed,  # keep(seed, m, k, K, p), see common.keep_mask (seed: a value, or a one-element tensor holding it)
    OFFSET_INT64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """Tile (program_id(0), program_id(1)) of the keep-mask, ``BLOCK_ROWS x BLOCK_COLS``."""
    seed = load_seed(seed)
    offs_m = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    k0 = tl.program_id(1) * BLOCK_COLS
    offs_k = k0 + tl.arange(0, BLOCK_COLS)
    keep = keep_mask(seed, offs_m, k0, K, p, BLOCK_COLS, OFFSET_INT64)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_k[None, :], keep.to(tl.uint8),
             mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


#: The launch's constexprs and options, by OFFSET_INT64.
_CONSTEXPRS = {wide: types.MappingProxyType(dict(OFFSET_INT64=wide, **KEEP_MASK.launch_kwargs()))
               for wide in (False, True)}


def keep_mask_tensor(m: int, k: int, dropout_p: float, seed, device: torch.device) -> torch.Tensor:
    """The (m, k) bool keep-mask of ``(seed, p)``, contiguous, on ``device``:
    :func:`fused_lora.dropout_mask` ``(seed, (m, k), dropout_p)`` bit for bit.
    ``seed``: an int, or a one-element int32/int64 tensor on ``device``
    holding it (read by the kernel: a CUDA graph's replay draws anew);
    ``dropout_p`` in (0, 1), checked by the caller (the seed by
    :func:`~fused_lora.kernels.common.seed_arg`)."""
    out = alloc((m, k), torch.uint8, device)
    if m and k:
        launch(keep_mask_kernel, (cdiv(m, KEEP_MASK.block_rows), cdiv(k, KEEP_MASK.block_cols)),
               (out, m, k, out.stride(0), dropout_p, seed_arg(seed, out.device)),
               _CONSTEXPRS[mask_counters_int64(m, k)])
    return out.view(torch.bool)
