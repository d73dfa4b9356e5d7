"""DoRA's weight norm in one read of W: ``ν = ‖W + s·B A‖`` per output
feature (row n of the (N, K) weight), the math of :mod:`fused_lora.ops`.

A program owns ``BLOCK_N`` rows and walks K in ``BLOCK_K`` tiles: each W
tile is loaded once, ``s·B A`` for it made by a dot of the rows' B (BLOCK_N,
r) with A's tile (r, BLOCK_K) into an fp32 accumulator (16-bit B and A: each
product exact in fp32, as PyTorch's fp32 ``B @ A`` of them; fp32 ones with
``INPUT_PRECISION="ieee"``), added to the tile in fp32, squared and summed
along K into one fp32 sum a row; the square root is rounded to nearest.
Nothing of size (N, K) is written: PyTorch's way makes ``W + s·B A`` in fp32
(a copy, the ``addmm`` and the norm's read: about 18 bytes of traffic a
weight element against 2 here). The sums run in a fixed order: bitwise
reproducible. Ranks above ``BLOCK_R`` (the config's ``max_block_r``) walk
their chunks inside the K loop; a rank of one chunk loads its B rows once.
An int8 W (``W_SCALE``: a quantized base) is dequantised as its tiles are
loaded, each row times its scale, rounded once to A's dtype
(``common.dequantize``): the norm of ``Ŵ + s·B A``, Ŵ as the GEMMs make it.
An NF4 W (``W_SCALE == 2``: (N, K/2) bytes, the absmax of each group of
``W_GROUP`` of a row) likewise, each value ``code[nibble] · absmax``
(``common.nf4_codes``), a (BLOCK_N, BLOCK_K / 2) tile of bytes a step.

Several adapters at once (``ADAPTERS``, :func:`dora_norms`: the DoRA
adapters among several, side by side in A's and B's rank, each of its own
columns ``[start, stop)`` and scale): each W tile, loaded and dequantised
once, takes each adapter's ``s·B A`` in turn (the rank in ``BLOCK_R``
chunks from its start), and each adapter's sum of squares goes in its own
column of a (BLOCK_N, ADAPTERS) accumulator: one read of W for every
adapter's norm, each sum in the one-adapter kernel's order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import alloc, dequantize, in_bounds, is_interpreted, load_operand, nf4_codes, repeat_groups
from .configs import (DORA_NORM_16BIT, DORA_NORM_FP32, DORA_NORM_QUANTIZED_16BIT, DORA_NORM_QUANTIZED_FP32, NormConfig,
                      block_r_for, cdiv)
from .launch import launch


# W's sizes and the rank are specialised as Triton does by default (a K tail's
# mask of unknown granularity made W's loads narrower and the int8 K tail
# spill, compile report); the adapters' count is not.
@triton.jit(do_not_specialize=["n_adapters"])
def dora_norm_kernel(
    w_ptr,  # (N, K)  W, any strides (int8 with W_SCALE 1; (N, K/2) bytes of NF4 with W_SCALE 2)
    b_ptr,  # (N, R)  lora_B, W's dtype (with W_SCALE: A's, the compute dtype)
    a_ptr,  # (R, K)  lora_A, W's dtype (likewise)
    out_ptr,  # (N,)  fp32 ν
    s_ptr,  # (N,)  W's row scales with W_SCALE 1, any floating dtype; (N, K/W_GROUP) NF4 absmax with 2
    code_ptr,  # (16,) fp32 NF4 code book with W_SCALE 2
    N,
    K,
    R,
    stride_wn,
    stride_wk,
    stride_bn,
    stride_br,
    stride_ar,
    stride_ak,
    stride_s,
    stride_s2,
    scaling,
    bounds_ptr,  # (2 n,) int32 with ADAPTERS: adapter a's rank columns [bounds[2a], bounds[2a + 1]); else None
    scales_ptr,  # (n,) fp32 with ADAPTERS: adapter a's scale (``scaling`` unused); else None
    n_adapters,  # n, with ADAPTERS (out (n, N)); else 1
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    EVEN_K: tl.constexpr,  # K a multiple of BLOCK_K: the K tail unmasked
    ONE_R_TILE: tl.constexpr,  # R <= BLOCK_R: B's rows loaded once, before the K loop
    UPCAST: tl.constexpr,  # bf16 under the interpreter (kernels.common.load_operand)
    INPUT_PRECISION: tl.constexpr,  # fp32 dots: "ieee"
    W_SCALE: tl.constexpr = 0,  # W quantized, dequantised as loaded: 1 int8, row n times s[n]; 2 NF4
    W_GROUP: tl.constexpr = 0,  # NF4: the absmax group along K
    ADAPTERS: tl.constexpr = 0,  # 0: one adapter (R, scaling); else a power of two >= n, the accumulator's width
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    offs_kb = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    b_rows = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn
    if ONE_R_TILE and ADAPTERS == 0:
        b = load_operand(b_rows + offs_r[None, :] * stride_br, n_in[:, None] & (offs_r[None, :] < R), UPCAST)
    if W_SCALE == 1:
        row_scale = tl.load(s_ptr + offs_n.to(tl.int64) * stride_s, mask=n_in, other=0.0).to(tl.float32)
    if W_SCALE == 2:
        s_rows = s_ptr + offs_n.to(tl.int64)[:, None] * stride_s
    if ADAPTERS == 0:
        squares = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        offs_a = tl.arange(0, ADAPTERS)
        squares = tl.zeros((BLOCK_N, ADAPTERS), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kb
        k_in = in_bounds(offs_k, K, EVEN_K)
        a_cols = a_ptr + offs_k.to(tl.int64)[None, :] * stride_ak
        if W_SCALE == 2:  # (two values of a row a byte; 0x77: two zeros, outside W)
            offs_k2 = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_rows + offs_k2.to(tl.int64)[None, :] * stride_wk,
                             mask=n_in[:, None] & in_bounds(offs_k2, K // 2, EVEN_K)[None, :], other=0x77)
            if BLOCK_K <= W_GROUP:
                absmax = tl.load(s_rows + (k0 // W_GROUP) * stride_s2, mask=n_in[:, None], other=0.0)
            else:
                offs_g = k0 // W_GROUP + tl.arange(0, BLOCK_K // W_GROUP)
                absmax = tl.load(s_rows + offs_g[None, :] * stride_s2,
                                 mask=n_in[:, None] & in_bounds(offs_g, K // W_GROUP, EVEN_K)[None, :], other=0.0)
                absmax = repeat_groups(absmax, W_GROUP, False)
            w = dequantize(nf4_codes(packed, code_ptr, False) * absmax.to(tl.float32), 1.0, a_ptr.dtype.element_ty,
                           UPCAST)
        else:
            w = load_operand(w_rows + offs_k.to(tl.int64)[None, :] * stride_wk, n_in[:, None] & k_in[None, :],
                             UPCAST and W_SCALE == 0)
        if W_SCALE == 1:
            w = dequantize(w, row_scale[:, None], a_ptr.dtype.element_ty, UPCAST)
        if ADAPTERS == 0:
            ba = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            if ONE_R_TILE:
                a = load_operand(a_cols + offs_r[:, None] * stride_ar, (offs_r[:, None] < R) & k_in[None, :], UPCAST)
                ba = tl.dot(b, a, ba, input_precision=INPUT_PRECISION)
            else:
                ba = _rank_chunks(b_rows, a_cols, ba, 0, R, offs_r, n_in, k_in, stride_br, stride_ar, BLOCK_R, UPCAST,
                                  INPUT_PRECISION)
            adapted = w.to(tl.float32) + scaling * ba
            squares += tl.sum(adapted * adapted, axis=1)
        else:
            for i in range(0, n_adapters):  # (the tile, loaded once, for each adapter in turn)
                ba = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
                ba = _rank_chunks(b_rows, a_cols, ba, tl.load(bounds_ptr + 2 * i), tl.load(bounds_ptr + 2 * i + 1),
                                  offs_r, n_in, k_in, stride_br, stride_ar, BLOCK_R, UPCAST, INPUT_PRECISION)
                adapted = w.to(tl.float32) + tl.load(scales_ptr + i) * ba
                squares += tl.where(offs_a[None, :] == i, tl.sum(adapted * adapted, axis=1)[:, None], 0.0)
    if ADAPTERS == 0:
        tl.store(out_ptr + offs_n, tl.sqrt_rn(squares), mask=n_in)
    else:
        tl.store(out_ptr + offs_a.to(tl.int64)[None, :] * N + offs_n[:, None], tl.sqrt_rn(squares),
                 mask=n_in[:, None] & (offs_a[None, :] < n_adapters))


@triton.jit
def _rank_chunks(b_rows, a_cols, ba, start, stop, offs_r, n_in, k_in, stride_br, stride_ar, BLOCK_R: tl.constexpr,
                 UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``ba + B[:, start:stop] A[start:stop, :]`` for the tile's rows and
    columns, the rank in BLOCK_R chunks from ``start``."""
    for r0 in range(start, stop, BLOCK_R):
        rr = r0 + offs_r
        b_chunk = load_operand(b_rows + rr[None, :] * stride_br, n_in[:, None] & (rr[None, :] < stop), UPCAST)
        a = load_operand(a_cols + rr[:, None] * stride_ar, (rr[:, None] < stop) & k_in[None, :], UPCAST)
        ba = tl.dot(b_chunk, a, ba, input_precision=INPUT_PRECISION)
    return ba


def norm_config(element_size: int, quantized: bool = False) -> NormConfig:
    """The shipped tile for A and B of this element size (``quantized``: W
    int8 or NF4)."""
    if element_size == 4:
        return DORA_NORM_QUANTIZED_FP32 if quantized else DORA_NORM_FP32
    return DORA_NORM_QUANTIZED_16BIT if quantized else DORA_NORM_16BIT


def dora_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
              weight_scale: torch.Tensor | None = None, code: torch.Tensor | None = None) -> torch.Tensor:
    """``ν = ‖W + s·B A‖`` per row of ``weight`` (N, K), fp32 (N,), with
    ``lora_A`` (r, K) and ``lora_B`` (N, r) in the weight's dtype (fp16,
    bf16 or fp32; any strides); ``weight_scale`` (N,), floating point: the
    weight is int8, ``W = Ŵ``, rounded to A's and B's dtype; or, with
    ``code`` (the fp32 (16,) NF4 code book), ``weight`` is NF4's (N, K/2)
    bytes and ``weight_scale`` its (N, K/group) absmax. The caller checks
    shapes and dtypes."""
    nf4 = _check_base("dora_norm", weight, weight_scale, code)
    n, k = weight.shape[0], weight.shape[1] * (2 if nf4 else 1)
    r = lora_A.shape[0]
    group = k // weight_scale.shape[1] if nf4 else 0
    out = alloc((n,), torch.float32, weight.device)
    if n == 0:
        return out
    cfg = norm_config(lora_A.element_size(), weight_scale is not None)
    block_r = block_r_for(r, cfg.max_block_r)
    upcast = is_interpreted(dora_norm_kernel) and lora_A.dtype == torch.bfloat16
    launch(dora_norm_kernel, (cdiv(n, cfg.block_n),), (
        weight, lora_B, lora_A, out, weight_scale if weight_scale is not None else out, code if nf4 else out,
        n, k, r, *weight.stride(), *lora_B.stride(), *lora_A.stride(),
        weight_scale.stride(0) if weight_scale is not None else 0, weight_scale.stride(1) if nf4 else 0,
        float(scaling), None, None, 1,
    ), dict(BLOCK_R=block_r, EVEN_K=k % cfg.block_k == 0, ONE_R_TILE=r <= block_r, UPCAST=upcast,
            INPUT_PRECISION="ieee", W_SCALE=2 if nf4 else int(weight_scale is not None), W_GROUP=group,
            **cfg.launch_kwargs()))
    return out


def _check_base(what: str, weight: torch.Tensor, weight_scale: torch.Tensor | None,
                code: torch.Tensor | None) -> bool:
    """Whether ``weight`` is NF4, having refused a base and its scale and code that do not go together."""
    nf4 = code is not None
    quantized = weight.dtype in (torch.int8, torch.uint8)
    if (weight_scale is not None) != quantized or nf4 != (weight.dtype == torch.uint8):
        raise ValueError(f"{what}: an int8 weight comes with its weight_scale, an NF4 (uint8) one with its "
                         f"weight_scale and code, and only those; got {weight.dtype} and "
                         f"{'a' if weight_scale is not None else 'no'} weight_scale, {'a' if nf4 else 'no'} code")
    return nf4


def dora_norms(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, bounds: torch.Tensor,
               scales: torch.Tensor, max_rank: int, weight_scale: torch.Tensor | None = None,
               code: torch.Tensor | None = None) -> torch.Tensor:
    """``ν_a = ‖W + s_a·B_a A_a‖`` per row of ``weight`` for each of n
    adapters at once, fp32 (n, N): one read of W. ``lora_A`` (R, K) and
    ``lora_B`` (N, R) hold the adapters side by side, adapter a's rank
    columns ``[bounds[2a], bounds[2a + 1])`` (``bounds`` (2n,) int32, on W's
    device), its scale ``scales[a]`` ((n,) fp32), its rank at most
    ``max_rank``; ``weight_scale`` and ``code`` as :func:`dora_norm`'s.
    The caller checks shapes and dtypes."""
    nf4 = _check_base("dora_norms", weight, weight_scale, code)
    n, k = weight.shape[0], weight.shape[1] * (2 if nf4 else 1)
    adapters = scales.shape[0]
    group = k // weight_scale.shape[1] if nf4 else 0
    out = alloc((adapters, n), torch.float32, weight.device)
    if n == 0 or adapters == 0:
        return out
    cfg = norm_config(lora_A.element_size(), weight_scale is not None)
    upcast = is_interpreted(dora_norm_kernel) and lora_A.dtype == torch.bfloat16
    launch(dora_norm_kernel, (cdiv(n, cfg.block_n),), (
        weight, lora_B, lora_A, out, weight_scale if weight_scale is not None else out, code if nf4 else out,
        n, k, lora_A.shape[0], *weight.stride(), *lora_B.stride(), *lora_A.stride(),
        weight_scale.stride(0) if weight_scale is not None else 0, weight_scale.stride(1) if nf4 else 0,
        1.0, bounds, scales, adapters,
    ), dict(BLOCK_R=block_r_for(max_rank, cfg.max_block_r), EVEN_K=k % cfg.block_k == 0, ONE_R_TILE=False,
            UPCAST=upcast, INPUT_PRECISION="ieee", W_SCALE=2 if nf4 else int(weight_scale is not None),
            W_GROUP=group, ADAPTERS=triton.next_power_of_2(adapters), **cfg.launch_kwargs()))
    return out
