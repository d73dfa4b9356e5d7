"""A quantized base made whole: ``Ŵ`` (N, K) in the compute dtype from an
int8 weight and its row scales, or from an NF4 weight's (N, K/2) bytes and
the absmax of each group of a row (:mod:`fused_lora.quant`), with the same
dequantisation the GEMMs apply to their tiles (``common.dequantize``,
``common.nf4_codes``), so the values are the same bit for bit.

The GEMMs decode a quantized B in their K loops, which is what small M wants
(the weight's bytes are the traffic). At large M every M tile decodes the
same weight again: the dispatch then makes Ŵ once a pass with this kernel
(one read of the quantized weight, one write of Ŵ) and runs the float path
on it (:func:`fused_lora.dispatch.plan`'s ``dequantize_base``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import alloc, dequantize, in_bounds, is_interpreted, nf4_codes, repeat_groups
from .configs import DEQUANT, cdiv
from .launch import launch


@triton.jit  # (W's sizes specialised as Triton does by default: the K tail's mask in runs of 16)
def dequantize_kernel(
    q_ptr,  # (N, K) int8, or (N, K/2) bytes of NF4 (NF4)
    s_ptr,  # (N,) the rows' scales, or (N, K/GROUP) absmax (NF4)
    code_ptr,  # (16,) fp32 NF4 code book (NF4)
    out_ptr,  # (N, K) Ŵ
    N, K,
    stride_qn, stride_qk,
    stride_sn, stride_sg,
    stride_on, stride_ok,
    NF4: tl.constexpr,
    GROUP: tl.constexpr,  # NF4: the absmax group along K
    EVEN_K: tl.constexpr,  # K a multiple of BLOCK_COLS
    UPCAST: tl.constexpr,  # bf16 under the interpreter (common.dequantize)
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,  # (of W's N rows, K columns)
):
    """``out = round(q · scale[n])``, or NF4 ``round(code[q] · absmax[n, k // GROUP])``,
    in out's dtype; program (i, j) makes tile (i, j) of (BLOCK_ROWS, BLOCK_COLS)."""
    offs_n = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    k0 = tl.program_id(1) * BLOCK_COLS
    offs_k = k0 + tl.arange(0, BLOCK_COLS)
    n_in = offs_n < N
    rows = offs_n.to(tl.int64)
    if NF4:  # (two values of a row a byte; 0x77, two zeros, outside)
        offs_k2 = k0 // 2 + tl.arange(0, BLOCK_COLS // 2)
        packed = tl.load(q_ptr + rows[:, None] * stride_qn + offs_k2[None, :] * stride_qk,
                         mask=n_in[:, None] & in_bounds(offs_k2, K // 2, EVEN_K)[None, :], other=0x77)
        if BLOCK_COLS <= GROUP:
            absmax = tl.load(s_ptr + rows[:, None] * stride_sn + (k0 // GROUP) * stride_sg, mask=n_in[:, None],
                             other=0.0)
        else:
            offs_g = k0 // GROUP + tl.arange(0, BLOCK_COLS // GROUP)
            absmax = tl.load(s_ptr + rows[:, None] * stride_sn + offs_g[None, :] * stride_sg,
                             mask=n_in[:, None] & in_bounds(offs_g, K // GROUP, EVEN_K)[None, :], other=0.0)
            absmax = repeat_groups(absmax, GROUP, False)
        w = dequantize(nf4_codes(packed, code_ptr, False) * absmax.to(tl.float32), 1.0,
                       out_ptr.dtype.element_ty, UPCAST)
    else:
        q = tl.load(q_ptr + rows[:, None] * stride_qn + offs_k[None, :] * stride_qk,
                    mask=n_in[:, None] & in_bounds(offs_k, K, EVEN_K)[None, :], other=0)
        scale = tl.load(s_ptr + rows * stride_sn, mask=n_in, other=0.0).to(tl.float32)
        w = dequantize(q, scale[:, None], out_ptr.dtype.element_ty, UPCAST)
    tl.store(out_ptr + rows[:, None] * stride_on + offs_k[None, :] * stride_ok, w,
             mask=n_in[:, None] & (offs_k < K)[None, :])


def dequantize_weight(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype,
                      code: torch.Tensor | None = None) -> torch.Tensor:
    """Ŵ (N, K), contiguous, in ``dtype`` (fp16, bf16 or fp32): of an int8
    ``weight`` (N, K) and its (N,) ``weight_scale``, or, with ``code`` (the
    fp32 (16,) NF4 code book), of an NF4 ``weight`` (N, K/2) uint8 and its
    (N, K/group) absmax. Any strides. The caller checks shapes and dtypes."""
    nf4 = code is not None
    n, k = weight.shape[0], weight.shape[1] * (2 if nf4 else 1)
    group = k // weight_scale.shape[1] if nf4 else 0
    out = alloc((n, k), dtype, weight.device)
    if n == 0 or k == 0:
        return out
    upcast = is_interpreted(dequantize_kernel) and dtype == torch.bfloat16
    launch(dequantize_kernel, (cdiv(n, DEQUANT.block_rows), cdiv(k, DEQUANT.block_cols)), (
        weight, weight_scale, code if nf4 else weight_scale, out, n, k, *weight.stride(),
        weight_scale.stride(0), weight_scale.stride(1) if nf4 else 0, *out.stride(),
    ), dict(NF4=nf4, GROUP=group, EVEN_K=k % DEQUANT.block_cols == 0, UPCAST=upcast, **DEQUANT.launch_kwargs()))
    return out
