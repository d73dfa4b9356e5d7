"""The fused GEMM: a frozen base product with the low-rank term added to its
fp32 accumulator, one kernel body for every GEMM-shaped pass.

The same body runs with its operands' roles swapped (see :mod:`fused_lora.ops`
for the math):

=========  ===============  ================  ===========================  =====================
pass       A (M, K)         B (K, N)          low-rank term                dropout mask
=========  ===============  ================  ===========================  =====================
forward    x                Wᵀ (strides)      s · xa · Bᵀ                  in-loop shrink: keep(x)
                                                                           on A's tiles (the dot
                                                                           with S only)
dx         dy               W                 (g · A) / (1-p)              keep(x) on the term
dW         dyᵀ (strides)    x                 none                         none
=========  ===============  ================  ===========================  =====================

The low-rank left factor (xa or g, fp32, (M, r)) is either read from memory
(``LOW_RANK == 1``, produced by the skinny pass) or accumulated inside the K
loop from the same A tiles (``LOW_RANK == 2``, "shrink in loop"; the program
with ``pid_n == 0`` stores it for the backward pass). The dx pass runs either
way: at small M it accumulates dy·B (S = B) in its K loop, and the dA pass
reads it from there. The in-loop forward with dropout multiplies each A tile
by its (M, K) keep-mask for the shrink's dot only (``SHRINK_DROPOUT``: the base
dot reads the tile as loaded), so every N tile draws the mask of its rows
again. An int8 B (a quantized base: ``B_SCALE``) is
dequantised as each tile is loaded, before its dot (``common.dequantize``).
Nothing of size (M, N) is materialised for the low-rank
term. Both split along K (small M): the term is linear in the left factor, so
each split adds its own part.
"""

from __future__ import annotations

import functools
import re
import types
from typing import Mapping, NamedTuple

import torch
import triton
import triton.language as tl

from .common import (AdapterColumns, DropoutRows, adapter_columns, alloc, check_adapter_columns, check_dropout_rows,
                     check_row_scale, dequantize, in_bounds, is_interpreted, keep_mask, load_operand, load_seed,
                     mask_counters_int64, nf4_codes, repeat_groups, rows_dropout_p, seed_arg)
from .configs import GEMM_LR_MAX_BLOCK_R, NUM_SMS_SM90, GemmConfig, block_r_for, cdiv, persistent_programs
from .launch import launch
from .skinny import launch_reductions

try:  # host-side tensor descriptors (TMA): Triton 3.4 and later
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

#: Triton 3.4's and 3.5's interpreters check a descriptor's strides in
#: elements (a multiple of 16) where the GPU, and the interpreter from 3.6 on,
#: checks bytes (a multiple of 16 bytes): under those interpreters descriptors
#: are made only where both hold (else pointers), so that the interpreted TMA
#: path runs instead of failing that check.
INTERPRETER_STRIDES_IN_ELEMENTS = tuple(int(n) for n in re.findall(r"\d+", triton.__version__)[:2]) < (3, 6)

LOW_RANK_NONE = 0
LOW_RANK_PRECOMPUTED = 1
LOW_RANK_IN_LOOP = 2


@triton.jit
def load_tile(desc, i, j, TRANS: tl.constexpr, UPCAST: tl.constexpr):
    """Tile ``[i:i+BI, j:j+BJ]`` of an operand through its tensor descriptor;
    with ``TRANS`` the descriptor describes the operand's transpose (stored
    the other way round), loaded as ``[j, i]`` and transposed in registers."""
    if TRANS:
        tile = desc.load([j, i]).T
    else:
        tile = desc.load([i, j])
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def make_descriptor(ptr, rows, cols, stride_row, stride_col, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                    TRANS: tl.constexpr):
    """The tensor descriptor of a (rows, cols) operand read in (BLOCK_ROWS,
    BLOCK_COLS) tiles, made by the kernel, as :func:`load_tile` reads it:
    with ``TRANS`` (the operand column-major) that of its transpose. The
    views host-side descriptors describe (``gemm._tma_view``)."""
    if TRANS:
        return tl.make_tensor_descriptor(ptr, shape=[cols, rows], strides=[stride_col, 1],
                                         block_shape=[BLOCK_COLS, BLOCK_ROWS])
    else:
        return tl.make_tensor_descriptor(ptr, shape=[rows, cols], strides=[stride_row, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_COLS])


# Sizes are specialised as Triton does by default (1, a multiple of 16, or
# neither), strides too: the wrapped row and column offsets (``offs % N``),
# and the store's mask along N, keep runs of 16 only where N's divisibility
# is known; unspecialised, every B and V load and C store was its own 2-byte
# access and the 128x256 dx spilled 1.5 KB (compile report, sm_90). A new
# token count recompiles only where it changes kind (at most three kernels a
# configuration). Split-K's block count, the slab strides (passed in units of
# 16 elements) and the seed are not specialised.
@triton.jit(do_not_specialize=["k_blocks_per_split", "stride_cs16", "stride_xas16", "seed"])
def lora_gemm_kernel(
    # pointers
    a_ptr,  # (M, K)  left operand
    b_ptr,  # (K, N)  right operand (the frozen weight, or x for dW)
    a_desc,  # TMA descriptor of A (or of Aᵀ when A_T) when TMA (made here instead with TMA_DEVICE), else None
    b_desc,  # TMA descriptor of B (or of Bᵀ when B_T) when TMA (made here instead with TMA_DEVICE), else None
    bias_ptr,  # (N,)    added to every row when HAS_BIAS
    u_ptr,  # (M, R)  fp32 low-rank left factor when LOW_RANK == 1
    s_ptr,  # (K, R)  shrink factor when LOW_RANK == 2 (forward: Aᵀ)
    v_ptr,  # (R, N)  low-rank right factor (forward: Bᵀ, dx: A)
    c_ptr,  # (M, N)  output
    xa_ptr,  # (M, R)  fp32: the in-loop shrink A·S, stored when LOW_RANK == 2 (split-K: (S, M, R) partials)
    w_ptr,  # (M,)    fp32 row scale of the in-loop shrink when ROW_SCALE
    ids_ptr,  # (M,)    int32 adapter of each row when ADAPTERS
    cid_ptr,  # (R,)    int32 adapter of each rank column when ADAPTERS (contiguous)
    csc_ptr,  # (R,)    fp32 scale of each rank column when ADAPTERS (contiguous)
    drp_ptr,  # (n,)    fp32 dropout probability of each adapter when ROW_P (row m's: drp[ids[m]])
    bsc_ptr,  # B's dequantisation scales when B_SCALE: int8 (N,) per column (forward), (K,) per row (dx);
    #           NF4 (W's rows, W's K / B_GROUP): the absmax of each block of B_GROUP along W's K
    bcode_ptr,  # (16,)   fp32 NF4 code book when B_SCALE >= 3
    # sizes
    M, N, K, R,
    k_blocks_per_split,  # split-K: program (·, s) walks BLOCK_K blocks [s·this, (s+1)·this) of K
    # strides
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_bias,
    stride_um, stride_ur,
    stride_sk, stride_sr,
    stride_vr, stride_vn,
    stride_cm, stride_cn,
    stride_cs16,  # split-K: C is the fp32 workspace of S partials, this many 16-element units apart
    stride_xam, stride_xar,
    stride_xas16,  # split-K: the xa partials, this many 16-element units apart
    stride_w,
    stride_ids,
    stride_bsc, stride_bsc2,  # (the scales' along W's rows, and, NF4, along its K blocks)
    # scalars (runtime: changing them never recompiles)
    lr_scale,  # the low-rank term is lr_scale · (U · V)
    sh_scale,  # SHRINK_DROPOUT: U = sh_scale · (A ⊙ keep) · S (the launcher passes 1/(1-p))
    p,  # dropout probability of the mask (LR_DROPOUT or SHRINK_DROPOUT)
    seed,  # Philox seed of that mask (the value, or a one-element int32 tensor: common.load_seed)
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    LOW_RANK: tl.constexpr,  # 0: none, 1: U read from u_ptr, 2: U = A·S in the K loop
    LR_DROPOUT: tl.constexpr,  # multiply the low-rank term by keep(m, n), the mask of C (M, N)
    SHRINK_DROPOUT: tl.constexpr,  # LOW_RANK == 2: the shrink's dot reads A ⊙ keep(m, k), the mask of A (M, K)
    ROW_SCALE: tl.constexpr,  # LOW_RANK == 2: U = w ⊙ (the shrink), row m times w[m]
    ADAPTERS: tl.constexpr,  # LOW_RANK == 2: U's (m, j) kept times csc[j] where ids[m] == cid[j] (not with ROW_SCALE)
    ROW_P: tl.constexpr,  # the mask's row m dropped with its adapter's probability drp[ids[m]], not p
    OFFSET_INT64: tl.constexpr,  # the mask's counters in 64 bits (common.mask_counters_int64)
    B_SCALE: tl.constexpr,  # B quantized, dequantised as loaded: 0 no; int8 times 1 bsc[n] (its columns),
    #                         2 bsc[k] (rows); NF4, 3 the forward's Wᵀ (packed along K), 4 dx's W (along N)
    B_GROUP: tl.constexpr,  # NF4: the absmax block along W's K
    UPCAST: tl.constexpr,  # interpreter + bf16: compute on fp32 tiles
    INPUT_PRECISION: tl.constexpr,  # fp32 dots: "ieee" or "tf32"
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masked tail in the K loop
    EVEN_R: tl.constexpr,  # R % BLOCK_R == 0: no rank mask (vector loads of the low-rank factors)
    ONE_R_TILE: tl.constexpr,  # LOW_RANK == 1: R <= BLOCK_R, the term in one rank tile (no loop over R)
    TMA: tl.constexpr,  # A and B tiles through tensor descriptors (Hopper TMA; zero fill outside)
    TMA_DEVICE: tl.constexpr,  # with TMA: the descriptors made by the kernel (global scratch), not passed
    A_T: tl.constexpr, B_T: tl.constexpr,  # the descriptor describes the transposed operand
    PERSISTENT: tl.constexpr,  # about one program per SM, each walking output tiles in a loop (no split-K)
    WARP_SPECIALIZE: tl.constexpr,  # the K loop warp-specialised (gpu_probe's rows only; configs says where
    #                                Triton's pass takes it): LOW_RANK 0, or 1 as FMAs after the loop
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = A·B + bias + lr_scale·(U·V) [⊙ keep], U = u or [w ⊙] sh_scale·(A [⊙ keep])·S; fp32 accumulation.

    Shapes as in the pointer comments. With ``LOW_RANK == 1`` the low-rank term
    (and its mask) is the accumulator's initial value and the rank is walked in
    ``BLOCK_R`` chunks, so any r works; with ``LOW_RANK == 2`` the shrink runs
    in the K loop, the whole rank must fit one ``BLOCK_R`` tile, and the term
    (masked, with ``LR_DROPOUT``) is added after the loop. ``SHRINK_DROPOUT``
    (the forward with dropout) masks the A tile of the shrink's dot instead:
    ``U = sh_scale·(A ⊙ keep)·S``, the mask of A's elements (keep(m, k) of the
    (M, K) matrix, the skinny pass's mask), drawn again by every N tile.
    ``ROW_SCALE`` multiplies the in-loop U's row m by ``w[m]`` after the loop,
    before it is stored and expanded (the row scale of :mod:`fused_lora.ops`;
    a precomputed U carries it already). ``ADAPTERS`` (several adapters side
    by side in the rank, :mod:`fused_lora.ops`): U's element (m, j) is kept,
    times ``csc[j]``, where row m's adapter ``ids[m]`` is column j's
    ``cid[j]``, and is 0 elsewhere (NaN on a row whose id is below -1:
    :func:`~fused_lora.kernels.common.adapter_columns`); never with
    ``ROW_SCALE``. ``ROW_P`` (several adapters, each its own dropout
    probability): the mask's row m keeps its elements with the probability
    of its adapter's ``drp[ids[m]]`` (1 on a row of no adapter's), the
    random numbers those of the one mask. ``B_SCALE``: B is int8, each tile dequantised as it is
    loaded, times ``bsc`` by column (1: the forward's ``Wᵀ``, the scales
    loaded once a tile) or by row (2: dx's ``W``, loaded a K step at a time,
    masked in the K tail), rounded once to A's dtype (``common.dequantize``);
    or B is NF4 (3: the forward's ``Wᵀ``, 4: dx's ``W``), W's (N, K/2)
    bytes two values of a row each (the even k in the high nibble, as
    bitsandbytes packs them), each tile ``code[nibble] · absmax`` of its
    element's group of ``B_GROUP`` along W's K (``common.nf4_codes``), rounded
    once to A's dtype likewise; never through TMA.

    Split-K (grid axis 1 of size S > 1): program (t, s) computes tile t over
    its own K range and stores the fp32 partial at ``C[s]``; split 0 also
    carries the bias, and the precomputed low-rank term. The in-loop shrink
    is split too: split s adds ``lr_scale·(A·S)_s·V`` over its K range only
    (the term is linear in A·S) and stores its xa partial at ``xa[s]``. The
    launcher sums the S partials of each in split order (deterministic, no
    atomics).

    ``PERSISTENT`` (no split-K): P programs, about one per SM, program p
    computing tiles p, p + P, ... in turn; the tile loop is marked for
    flattening with the K loop, where the compiler can (it then prefetches the
    next tile's operands during this tile's epilogue).

    ``TMA``: the A and B tiles of the K loop come through tensor descriptors
    (Hopper's copy engine, which zero-fills outside the operand, so no masks);
    a column-major operand is described through its transpose (``A_T``,
    ``B_T``). Everything else is unchanged. ``TMA_DEVICE``: each program makes
    the two descriptors itself, from the pointers and strides, in the global
    scratch the launch allocates (no host-side descriptor to encode and pass
    at each launch: host time).

    ``WARP_SPECIALIZE`` (``LOW_RANK`` 0 or 1, through TMA with ``TMA_DEVICE``,
    one rank tile, no mask on the term, no split-K, not persistent: the
    launcher's contract): the K loop marked for Triton's warp
    specialisation, and the precomputed term added after it as ``BLOCK_R``
    rank-one updates in fp32 (a dot there, or anything looping or branching,
    and Triton's pass leaves the loop or fails: ``configs``). No plan runs
    it; ``bench/gpu_probe.py`` times it.
    """
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if TMA_DEVICE:
        a_desc = make_descriptor(a_ptr, M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K, A_T)
        b_desc = make_descriptor(b_ptr, K, N, stride_bk, stride_bn, BLOCK_K, BLOCK_N, B_T)
    num_tiles = num_pid_m * num_pid_n
    if PERSISTENT:
        num_my_tiles = tl.cdiv(num_tiles - tl.program_id(0), tl.num_programs(0))
    else:  # this program's tile only: a constant trip count of 1 compiles to no loop
        num_my_tiles: tl.constexpr = 1
    for i in tl.range(0, num_my_tiles, flatten=PERSISTENT):
        if PERSISTENT:
            pid = tl.program_id(0) + i * tl.num_programs(0)
            pid_k = tl.full([], 0, tl.int32)  # (a constant: the K loop's bounds do not depend on the tile)
        else:
            pid = tl.program_id(0)
            pid_k = tl.program_id(1)
        # Grouped ordering: GROUP_M row-tiles share each B column-tile in L2.
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        mask_m = offs_m < M
        mask_n = offs_n < N
        # Loads wrap out-of-range rows/columns onto valid ones (their results are
        # never stored), so only the K tail needs a mask in the loop. Row and
        # column offsets are int64 before they meet a stride: M·stride can pass 2**31.
        rows = (offs_m % M).to(tl.int64)
        cols = (offs_n % N).to(tl.int64)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if LOW_RANK == 1 and not WARP_SPECIALIZE:
            # Precomputed U: the low-rank term (masked) initialises the
            # accumulator, so no second (BLOCK_M, BLOCK_N) fp32 tile is ever live.
            # Under split-K only split 0 carries it (the other splits' zeros go
            # through the mask too: keeping the mask outside this branch is what
            # keeps the 128x128 dropout epilogue from spilling, compile report).
            # The mask is drawn before the low-rank dot, while no accumulator is
            # live (compile report, 128x128 on 8 warps, four columns a Philox
            # call: 168 registers, against about 195 when drawn after it; with a
            # call per element, drawn after it, Triton 3.6's code spilled 1.7 KB.
            # Eight columns a call: 184 on Triton 3.6 and 3.9, no spill).
            # Over several rank tiles it is drawn after their loop instead: drawn
            # before, it stayed live through the loop, and 128x64x64 on 4 warps
            # spilled 48-284 B at 255 registers (a 64 rank tile, Triton 3.6 and
            # 3.9, compiled as the runtime specialises); drawn after, every tile
            # took 30-70 registers fewer, at most 226, no spill.
            if LR_DROPOUT and ONE_R_TILE:
                keep = keep_mask(load_seed(seed), offs_m, pid_n * BLOCK_N, N,
                                 rows_dropout_p(p, drp_ptr, ids_ptr, offs_m, mask_m, stride_ids, ROW_P), BLOCK_N,
                                 OFFSET_INT64)
            if pid_k == 0:
                # (One rank tile: a loop of one constant trip, which compiles to none. A loop over R,
                # even of one trip, kept u's fp32 tile and v's in shared memory beside the K loop's
                # stages and took some 60 registers more: compile report, 128x128 dx at a 64 tile.)
                for r0 in range(0, BLOCK_R if ONE_R_TILE else R, BLOCK_R):
                    r_in = in_bounds(offs_r, R - r0, EVEN_R)
                    u = tl.load(u_ptr + rows[:, None] * stride_um + (r0 + offs_r)[None, :] * stride_ur,
                                mask=r_in[None, :], other=0.0)
                    v = load_operand(v_ptr + (r0 + offs_r)[:, None] * stride_vr + cols[None, :] * stride_vn,
                                     r_in[:, None], UPCAST)
                    acc = tl.dot((u * lr_scale).to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
            if LR_DROPOUT:
                if not ONE_R_TILE:
                    keep = keep_mask(load_seed(seed), offs_m, pid_n * BLOCK_N, N,
                                     rows_dropout_p(p, drp_ptr, ids_ptr, offs_m, mask_m, stride_ids, ROW_P), BLOCK_N,
                                     OFFSET_INT64)
                # Multiply (not select) so that NaN/Inf propagate as in x * mask.
                acc = acc * keep.to(tl.float32)

        # In whole blocks, so that the compiler knows k_lo's alignment (vector loads, pipelining).
        k_lo = pid_k * k_blocks_per_split * BLOCK_K
        k_len = min(K - k_lo, k_blocks_per_split * BLOCK_K)
        a_ptrs = a_ptr + k_lo.to(tl.int64) * stride_ak + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        if B_SCALE == 3:  # NF4 Wᵀ: a byte holds two of B's rows (a (BLOCK_K / 2, BLOCK_N) tile of bytes)
            offs_k2 = tl.arange(0, BLOCK_K // 2)
            b_ptrs = (b_ptr + (k_lo // 2).to(tl.int64) * stride_bk + offs_k2[:, None] * stride_bk
                      + cols[None, :] * stride_bn)
        elif B_SCALE == 4:  # NF4 W: a byte holds two of B's columns (a (BLOCK_K, BLOCK_N / 2) tile of bytes)
            cols2 = ((pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)) % (N // 2)).to(tl.int64)
            b_ptrs = b_ptr + k_lo.to(tl.int64) * stride_bk + offs_k[:, None] * stride_bk + cols2[None, :] * stride_bn
        else:
            b_ptrs = b_ptr + k_lo.to(tl.int64) * stride_bk + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
        if LOW_RANK == 2:
            # S's rows are indexed from this split's K offset at each step (a
            # pointer started at k_lo and advanced, as A's and B's are, made
            # Triton 3.6's code for the fp32 32x64 tile spill 16 bytes).
            s_ptrs = s_ptr + offs_k[:, None] * stride_sk + offs_r[None, :] * stride_sr
            xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            r_in = in_bounds(offs_r, R, EVEN_R)
            if SHRINK_DROPOUT:
                shrink_seed = load_seed(seed)
                shrink_p = rows_dropout_p(p, drp_ptr, ids_ptr, offs_m, mask_m, stride_ids, ROW_P)
        if B_SCALE == 1:  # (B's columns are C's: one scale per column of the tile, for the whole K loop)
            b_col_scale = tl.load(bsc_ptr + cols * stride_bsc).to(tl.float32)
        for k0 in tl.range(0, k_len, BLOCK_K, warp_specialize=WARP_SPECIALIZE):
            if not EVEN_K:
                k_in = offs_k < k_len - k0
            # (an int8 B is widened by its dequantisation, not by UPCAST)
            if B_SCALE >= 3:  # NF4 (never through TMA): each value's code times its group's absmax
                if EVEN_K:
                    a = load_operand(a_ptrs, None, UPCAST)
                else:
                    a = load_operand(a_ptrs, k_in[None, :], UPCAST)
                if B_SCALE == 3:  # (the groups run along the tile's K: one absmax a column, or a few)
                    g0 = (k_lo + k0) // B_GROUP
                    if EVEN_K:
                        packed = tl.load(b_ptrs)
                    else:  # (0x77: two zeros; K is even)
                        packed = tl.load(b_ptrs, mask=(offs_k2 < (k_len - k0) // 2)[:, None], other=0x77)
                    if BLOCK_K <= B_GROUP:
                        absmax = tl.load(bsc_ptr + cols * stride_bsc + g0 * stride_bsc2)[None, :]
                    else:
                        offs_g = tl.arange(0, BLOCK_K // B_GROUP)
                        g_ptrs = bsc_ptr + cols[None, :] * stride_bsc + (g0 + offs_g)[:, None] * stride_bsc2
                        if EVEN_K:
                            absmax = tl.load(g_ptrs)
                        else:
                            absmax = tl.load(g_ptrs, mask=(offs_g < tl.cdiv(k_len - k0, B_GROUP))[:, None], other=0.0)
                        absmax = repeat_groups(absmax, B_GROUP, True)
                    b = nf4_codes(packed, bcode_ptr, True) * absmax.to(tl.float32)
                else:  # (along the tile's N: one absmax a row, or a few)
                    k_rows = (k_lo + k0 + offs_k).to(tl.int64) * stride_bsc
                    if EVEN_K:
                        packed = tl.load(b_ptrs)
                    else:
                        packed = tl.load(b_ptrs, mask=k_in[:, None], other=0x77)
                    if BLOCK_N <= B_GROUP:
                        g_ptrs = bsc_ptr + k_rows + ((pid_n * BLOCK_N) // B_GROUP) * stride_bsc2
                        if EVEN_K:
                            absmax = tl.load(g_ptrs)[:, None]
                        else:
                            absmax = tl.load(g_ptrs, mask=k_in, other=0.0)[:, None]
                    else:
                        offs_g = ((pid_n * BLOCK_N) // B_GROUP + tl.arange(0, BLOCK_N // B_GROUP)) % (N // B_GROUP)
                        g_ptrs = bsc_ptr + k_rows[:, None] + offs_g[None, :] * stride_bsc2
                        if EVEN_K:
                            absmax = tl.load(g_ptrs)
                        else:
                            absmax = tl.load(g_ptrs, mask=k_in[:, None], other=0.0)
                        absmax = repeat_groups(absmax, B_GROUP, False)
                    b = nf4_codes(packed, bcode_ptr, False) * absmax.to(tl.float32)
                b = dequantize(b, 1.0, a_ptr.dtype.element_ty, UPCAST)
            elif TMA:  # the copy engine zero-fills rows, columns and the K tail outside the operands
                a = load_tile(a_desc, pid_m * BLOCK_M, k_lo + k0, A_T, UPCAST)
                b = load_tile(b_desc, k_lo + k0, pid_n * BLOCK_N, B_T, UPCAST and B_SCALE == 0)
            elif EVEN_K:  # no K tail: unmasked loads (the common case, K a multiple of BLOCK_K)
                a = load_operand(a_ptrs, None, UPCAST)
                b = load_operand(b_ptrs, None, UPCAST and B_SCALE == 0)
            else:
                a = load_operand(a_ptrs, k_in[None, :], UPCAST)
                b = load_operand(b_ptrs, k_in[:, None], UPCAST and B_SCALE == 0)
            if B_SCALE == 1:
                b = dequantize(b, b_col_scale[None, :], a_ptr.dtype.element_ty, UPCAST)
            elif B_SCALE == 2:
                k_scale_ptrs = bsc_ptr + (k_lo + k0 + offs_k).to(tl.int64) * stride_bsc
                if EVEN_K:
                    b_row_scale = tl.load(k_scale_ptrs)
                else:
                    b_row_scale = tl.load(k_scale_ptrs, mask=k_in, other=0.0)
                b = dequantize(b, b_row_scale.to(tl.float32)[:, None], a_ptr.dtype.element_ty, UPCAST)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            if LOW_RANK == 2:
                s_mask = r_in[None, :]
                if not EVEN_K:
                    s_mask = s_mask & k_in[:, None]
                s = load_operand(s_ptrs + (k_lo + k0) * stride_sk, s_mask, UPCAST)
                if SHRINK_DROPOUT:
                    # drop(A) for this dot only; multiply (not select): NaN/Inf propagate as in x * mask.
                    # (The K tail's columns past K are zeros, whatever their mask.)
                    keep_a = keep_mask(shrink_seed, offs_m, k_lo + k0, K, shrink_p, BLOCK_K, OFFSET_INT64)
                    xa = tl.dot(a * keep_a.to(a.dtype), s, xa, input_precision=INPUT_PRECISION)
                else:
                    xa = tl.dot(a, s, xa, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += (BLOCK_K // 2 if B_SCALE == 3 else BLOCK_K) * stride_bk

        if LOW_RANK == 1 and WARP_SPECIALIZE:
            # The precomputed term (never masked here; one rank tile, no split-K: the launcher's
            # contract) as BLOCK_R rank-one updates of the accumulator in fp32, unrolled, after the K loop
            # and in no branch: Triton's warp specialisation takes a kernel whose one dot is the K loop's,
            # with no loop or branch after it (configs, above _GEMM_CANDIDATES_16BIT). u·s is not rounded
            # to v's dtype here, as it is for the dot.
            for j in tl.static_range(BLOCK_R):
                # (j < R as vectors: Triton 3.9's interpreter takes no scalar condition in a mask)
                u_j = tl.load(u_ptr + rows * stride_um + j * stride_ur, mask=tl.full([BLOCK_M], j, tl.int32) < R,
                              other=0.0)
                v_j = tl.load(v_ptr + j * stride_vr + cols * stride_vn, mask=tl.full([BLOCK_N], j, tl.int32) < R,
                              other=0.0).to(tl.float32)
                acc += (u_j * lr_scale)[:, None] * v_j[None, :]
        if LOW_RANK == 2:
            if SHRINK_DROPOUT:
                xa = xa * sh_scale  # drop(A) = A ⊙ keep / (1 - p)
            if ADAPTERS:
                xa = adapter_columns(xa, ids_ptr, cid_ptr, csc_ptr, offs_m, mask_m, offs_r, r_in, stride_ids)
            if ROW_SCALE:  # (before the padded columns are cleared: w may be ±Inf or NaN too)
                # (from offs_m, live for the stores: the int64 rows kept past the loop made Triton 3.6's
                # fp32 32x64 in-loop forward spill, compile report)
                xa = xa * tl.load(w_ptr + offs_m.to(tl.int64) * stride_w, mask=mask_m, other=0.0)[:, None]
            # Clear the padded rank columns: x·0 is NaN where x is ±Inf, and
            # that NaN must not reach the real columns through the next dot.
            xa = tl.where(r_in[None, :], xa, 0.0)
            if pid_n == 0:
                xa_ptrs = (xa_ptr + pid_k.to(tl.int64) * stride_xas16 * 16
                           + offs_m[:, None].to(tl.int64) * stride_xam + offs_r[None, :] * stride_xar)
                tl.store(xa_ptrs, xa, mask=mask_m[:, None] & r_in[None, :])
            v = load_operand(v_ptr + offs_r[:, None] * stride_vr + cols[None, :] * stride_vn,
                             r_in[:, None], UPCAST)
            if LR_DROPOUT:
                # (dx at small M: the term is masked, so it needs a tile of its own; the
                # configurations keep these tiles small enough for two, compile report)
                keep = keep_mask(load_seed(seed), offs_m, pid_n * BLOCK_N, N,
                                 rows_dropout_p(p, drp_ptr, ids_ptr, offs_m, mask_m, stride_ids, ROW_P), BLOCK_N,
                                 OFFSET_INT64)
                lr = tl.dot((xa * lr_scale).to(v.dtype), v, input_precision=INPUT_PRECISION)
                acc += lr * keep.to(tl.float32)
            else:
                acc = tl.dot((xa * lr_scale).to(v.dtype), v, acc, input_precision=INPUT_PRECISION)

        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols * stride_bias).to(tl.float32)
            acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
        # This split's partial (split-K; else C itself). The slab stride is a
        # multiple of 16 elements so that the stores stay vectorised.
        c_split = c_ptr + pid_k.to(tl.int64) * stride_cs16 * 16
        c_ptrs = c_split + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :].to(tl.int64) * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def lora_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    config: GemmConfig,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    shrink: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    lr_scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor = 0,
    shrink_dropout: bool = False,
    row_scale: torch.Tensor | None = None,
    adapters: AdapterColumns | None = None,
    dropout_rows: DropoutRows | None = None,
    b_scale: torch.Tensor | None = None,
    b_scale_dim: int = 1,
    b_code: torch.Tensor | None = None,
    input_precision: str = "ieee",
    tma: bool = False,
    tma_device: bool = False,
    persistent: bool = False,
    num_sms: int = NUM_SMS_SM90,
    warp_specialize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``C = a @ b + bias + lr_scale * (U @ v)``, ``U = u`` or ``a @ shrink``.

    a (M, K), b (K, N), bias (N,), u (M, r) fp32, shrink (K, r), v (r, N); any
    strides. With ``dropout_p > 0`` the low-rank term is multiplied by the
    keep-mask of the (M, N) output; or, with ``shrink_dropout`` (the in-loop
    forward), the shrink reads ``drop(a) = a ⊙ keep / (1 - p)``, the keep-mask
    of a (M, K), the one the skinny pass draws. ``row_scale`` (M,) fp32, with
    ``shrink``: the in-loop shrink's row m times ``row_scale[m]``; ``adapters``
    (:class:`~fused_lora.kernels.common.AdapterColumns`), with ``shrink``: the
    in-loop shrink's columns kept on the rows of their adapters.
    ``dropout_rows`` (:class:`~fused_lora.kernels.common.DropoutRows`), with
    ``dropout_p > 0``: each row of the mask drawn with its adapter's
    probability (``dropout_p`` then only says that a mask is drawn), and no
    ``1/(1 - p)`` applied: the caller folds each adapter's into its scales.
    ``b_scale``: b is int8, dequantised as its tiles are loaded,
    ``round(b · b_scale)`` in a's dtype, ``b_scale`` (floating point, any
    stride) one value per column of b (``b_scale_dim=1``, (N,): the forward's
    ``Wᵀ``) or per row (``b_scale_dim=0``, (K,): dx's ``W``). ``b_code``
    (16,) fp32, the NF4 code book: b is NF4 instead, uint8, two values a
    byte along the dimension ``b_scale_dim`` is not (the forward's ``Wᵀ``:
    b (K/2, N); dx's ``W``: b (K, N/2)), ``b_scale`` (W's rows, W's
    columns / group) in W's orientation whatever ``b_scale_dim``, the absmax
    of each group of W's row (``fused_lora.quant``). Returns
    ``(C, xa)`` where ``xa = [w ⊙] [drop](a) @ shrink`` (fp32, (M, r))
    when ``shrink`` is given, else None. ``config.split_k > 1`` splits K over
    that many programs per tile (fp32 partials of C, and of xa, then one
    ordered reduction launch for both). ``tma``: load the a and b tiles
    through tensor descriptors where both operands allow one (else pointers);
    ``tma_device``: those descriptors made by the kernel (in the global
    scratch Triton's allocator gives the launch: :func:`ensure_allocator`)
    instead of on the host for each launch. ``persistent``: without split-K,
    and with more output tiles than the GPU runs programs at once, a
    persistent grid of that many programs walks the tiles (else one program
    per tile and split; the results are the same bit for bit); ``num_sms``:
    the GPU's SMs, which size that grid (the dispatch's
    :func:`fused_lora.dispatch.device_target`). ``warp_specialize``: the K
    loop marked for Triton's warp specialisation, the precomputed term (if
    any) added as fp32 rank-one updates after it (:func:`_why_not_warp_specialized`
    says where it runs; ``bench/gpu_probe.py``'s rows time it, no plan runs
    it: ``kernels/configs.py`` says where Triton's pass engages).
    """
    # 1. constraints (the public API validated the user's arguments; these
    #    guard the launcher's own contract)
    M, K = a.shape
    b_scale_mode, b_group = _check_b_scale(b, b_scale, b_scale_dim, b_code)
    K2, N = b.shape
    if b_scale_mode == 3:
        K2 *= 2
    elif b_scale_mode == 4:
        N *= 2
    if b_group and b_scale.shape != ((N, K // b_group) if b_scale_mode == 3 else (K, N // b_group)):
        raise ValueError(f"lora_gemm: b_scale {tuple(b_scale.shape)} does not match an NF4 b of "
                         f"{tuple(b.shape)} bytes against a {tuple(a.shape)}")
    if K2 != K:
        raise ValueError(f"lora_gemm: a is {tuple(a.shape)} but b is {tuple(b.shape)}")
    if u is not None and shrink is not None:
        raise ValueError("lora_gemm: pass u (precomputed) or shrink (in loop), not both")
    low_rank = LOW_RANK_NONE if v is None else (LOW_RANK_IN_LOOP if shrink is not None else LOW_RANK_PRECOMPUTED)
    r = 0 if v is None else v.shape[0]
    if low_rank != LOW_RANK_NONE:
        if v.shape[1] != N:
            raise ValueError(f"lora_gemm: v is {tuple(v.shape)}, expected ({r}, {N})")
        left = u if u is not None else shrink
        if left is None or left.shape != ((M, r) if u is not None else (K, r)):
            raise ValueError("lora_gemm: the low-rank left factor does not match a and v")
        if u is not None and u.dtype != torch.float32:
            raise ValueError("lora_gemm: u must be float32")
    if shrink_dropout and shrink is None:
        raise ValueError("lora_gemm: shrink_dropout masks the in-loop shrink's input: pass shrink")
    shrink_dropout = shrink_dropout and dropout_p > 0.0
    check_row_scale("lora_gemm", row_scale, shrink, M)  # (the in-loop shrink's rows)
    check_adapter_columns("lora_gemm", adapters, shrink, M, row_scale)
    check_dropout_rows("lora_gemm", dropout_rows, M, adapters)
    row_p = dropout_rows is not None and dropout_p > 0.0 and (shrink_dropout or low_rank != LOW_RANK_NONE)

    # 2. what the sizes and flags decide (the rank tile, split-K, the constexprs), cached
    interpreted = is_interpreted(lora_gemm_kernel)
    shape = _launch_shape(M, N, K, r, low_rank, v.element_size() if v is not None else 0, bias is not None,
                          shrink_dropout, row_scale is not None, adapters is not None, dropout_p > 0.0, row_p,
                          interpreted and a.dtype == torch.bfloat16, input_precision, b_scale_mode, b_group,
                          config)
    block_r, split_k = shape.block_r, shape.split_k
    if low_rank == LOW_RANK_IN_LOOP and r > block_r:
        raise ValueError(f"lora_gemm: the in-loop shrink holds the whole rank in one tile (r <= {block_r})")
    if warp_specialize:
        why = _why_not_warp_specialized(a, b, config, low_rank, dropout_p, b_scale_mode, split_k, persistent,
                                        r, block_r, tma, tma_device)
        if why:
            raise ValueError(f"lora_gemm: warp_specialize does not run {why}")
    if shrink is not None and K * abs(shrink.stride(0)) >= 2**31:
        shrink = shrink.contiguous()  # (the kernel indexes its rows in 32 bits: k · stride)

    # 3. allocate (NaN-poisoned: every element must be written)
    c = alloc((M, N), out_dtype, a.device)
    xa = alloc((M, r), torch.float32, a.device) if low_rank == LOW_RANK_IN_LOOP else None
    if M == 0 or N == 0:
        return c, xa
    target = c if split_k == 1 else alloc((split_k, M, N), torch.float32, a.device, strides=(shape.slab, N, 1))
    xa_target = xa
    if xa is not None and split_k > 1:
        xa_target = alloc((split_k, M, r), torch.float32, a.device, strides=(shape.xa_slab, r, 1))

    # 4. launch
    dummy = c
    u_ = u if u is not None else dummy
    s_ = shrink if shrink is not None else dummy
    v_ = v if v is not None else dummy
    xa_ = xa_target if xa is not None else dummy
    programs = persistent_programs(config, a.element_size(), block_r, low_rank == LOW_RANK_IN_LOOP, interpreted,
                                   num_sms) if persistent and split_k == 1 else 0
    persistent = 0 < programs < shape.tiles
    grid = (programs,) if persistent else (shape.tiles, split_k)
    descs = None
    if tma and K and b_scale_mode < 3:
        descs = _device_descriptors(a, b) if tma_device else tma_descriptors(a, b, config)
    a_desc, a_t, b_desc, b_t = descs if descs is not None else (None, False, None, False)
    launch(lora_gemm_kernel, grid, (
        a, b, a_desc, b_desc, bias if bias is not None else dummy, u_, s_, v_, target, xa_,
        row_scale if row_scale is not None else xa_,
        *(adapters if adapters is not None else (dropout_rows.row_ids if row_p else xa_, xa_, xa_)),
        dropout_rows.p if row_p else xa_,
        b_scale if b_scale is not None else xa_, b_code if b_code is not None else xa_,
        M, N, K, r, shape.blocks_per_split,
        *a.stride(), *b.stride(),
        bias.stride(0) if bias is not None else 0,
        *(u_.stride() if u is not None else (0, 0)),
        *(s_.stride() if shrink is not None else (0, 0)),
        *(v_.stride() if v is not None else (0, 0)),
        target.stride(-2), target.stride(-1), shape.slab // 16 if split_k > 1 else 0,
        *(xa_.stride()[-2:] if xa is not None else (0, 0)),
        shape.xa_slab // 16 if xa is not None and split_k > 1 else 0,
        row_scale.stride(0) if row_scale is not None else 0,
        adapters.row_ids.stride(0) if adapters is not None else dropout_rows.row_ids.stride(0) if row_p else 0,
        b_scale.stride(0) if b_scale is not None else 0, b_scale.stride(1) if b_group else 0,
        float(lr_scale), 1.0 / (1.0 - dropout_p) if shrink_dropout and not row_p else 1.0, float(dropout_p),
        seed_arg(seed, a.device),
    ), dict(
        OFFSET_INT64=mask_counters_int64(M, K if shrink_dropout else N),
        TMA=descs is not None, TMA_DEVICE=descs is not None and tma_device, A_T=a_t, B_T=b_t,
        PERSISTENT=persistent, WARP_SPECIALIZE=warp_specialize,
        **shape.constexprs,
    ))
    if split_k > 1:
        launch_reductions([(target, c, None)] + ([(xa_target, xa, None)] if xa is not None else []))
    return c, xa


def _why_not_warp_specialized(a: torch.Tensor, b: torch.Tensor, config: GemmConfig, low_rank: int, dropout_p: float,
                              b_scale_mode: int, split_k: int, persistent: bool, r: int, block_r: int, tma: bool,
                              tma_device: bool) -> str:
    """Why :func:`lora_gemm` cannot run these arguments with
    ``warp_specialize`` ('' where it can): the kernel compiled where Triton's
    pass takes it (one dot, the K loop's, its tiles through descriptors the
    kernel makes, four warps) and the term as one rank tile of updates."""
    if low_rank == LOW_RANK_IN_LOOP:
        return "with the in-loop shrink (its second dot fails Triton's pass)"
    if low_rank == LOW_RANK_PRECOMPUTED and dropout_p > 0.0:
        return "with the low-rank term's dropout mask"
    if b_scale_mode:
        return "with a quantized b"
    if config.num_warps != 4:
        return f"on {config.num_warps} warps (Triton's pass takes 4)"
    if split_k > 1:
        return f"under split-K ({split_k} splits)"
    if persistent:
        return "on the persistent grid"
    if r > block_r:
        return f"with a rank of {r} in tiles of {block_r} (the term in one rank tile)"
    if not (tma and tma_device and a.shape[1] and _operand_views(a, b) is not None):
        return ("without TMA loads through descriptors the kernel makes (tma=True, tma_device=True, operands "
                "that TMA reads)")
    return ""


def _check_b_scale(b: torch.Tensor, b_scale, dim: int, code) -> tuple[int, int]:
    """The kernel's ``B_SCALE`` and ``B_GROUP`` for :func:`lora_gemm`'s
    ``b``, ``b_scale`` and ``b_code`` (the launcher's contract: an int8 b
    comes with a floating-point scale of one value per row or column of it,
    and only an int8 b; an NF4 b, uint8, with its code book and its absmax
    in W's orientation, one per group of a power of two >= 2 of W's row;
    the group against b's size is the caller's to check)."""
    if code is not None:
        if (b.dtype != torch.uint8 or b_scale is None or not b_scale.is_floating_point() or b_scale.dim() != 2
                or code.shape != (16,) or code.dtype != torch.float32 or not code.is_contiguous() or dim not in (0, 1)):
            raise ValueError(f"lora_gemm: an NF4 b is uint8 with its fp32 (16,) b_code and 2-D floating b_scale "
                             f"(b_scale_dim 0 or 1); got b {b.dtype}, b_scale "
                             f"{None if b_scale is None else (b_scale.dtype, tuple(b_scale.shape))}, b_code "
                             f"{code.dtype} {tuple(code.shape)}, b_scale_dim {dim}")
        w_cols = 2 * b.shape[0] if dim == 1 else 2 * b.shape[1]  # (W's K)
        groups = b_scale.shape[1]
        group = w_cols // groups if groups else 0
        if not groups or group * groups != w_cols or group < 2 or group & (group - 1):
            raise ValueError(f"lora_gemm: an NF4 b's b_scale {tuple(b_scale.shape)} must split W's {w_cols} columns "
                             "into groups of a power of two >= 2")
        return (3 if dim == 1 else 4), group
    if b_scale is None:
        if b.dtype == torch.int8:
            raise ValueError("lora_gemm: an int8 b needs its b_scale")
        if b.dtype == torch.uint8:
            raise ValueError("lora_gemm: a uint8 (NF4) b needs its b_scale and b_code")
        return 0, 0
    size = b.shape[dim] if dim in (0, 1) else None
    if b.dtype != torch.int8 or size is None or b_scale.shape != (size,) or not b_scale.is_floating_point():
        raise ValueError(f"lora_gemm: b_scale dequantises an int8 b, one floating-point value per "
                         f"{'row' if dim == 0 else 'column'} of it (b_scale_dim 0 or 1); got b {b.dtype} "
                         f"{tuple(b.shape)}, b_scale {b_scale.dtype} {tuple(b_scale.shape)}, b_scale_dim {dim}")
    return (2 if dim == 0 else 1), 0


class _LaunchShape(NamedTuple):
    """What :func:`lora_gemm` derives from the problem's sizes and flags alone."""

    block_r: int
    split_k: int
    blocks_per_split: int
    slab: int  # elements between split-K partials of C (a multiple of 16: aligned stores)
    xa_slab: int  # likewise for xa's
    tiles: int
    constexprs: Mapping[str, object]


@functools.lru_cache(maxsize=4096)  # (host time per call: the same shapes come back every step)
def _launch_shape(M: int, N: int, K: int, r: int, low_rank: int, v_elt: int, has_bias: bool, shrink_dropout: bool,
                  row_scale: bool, adapters: bool, dropout: bool, row_p: bool, upcast: bool, input_precision: str,
                  b_scale: int, b_group: int, config: GemmConfig) -> _LaunchShape:
    if low_rank == LOW_RANK_PRECOMPUTED:
        block_r = block_r_for(r, GEMM_LR_MAX_BLOCK_R[v_elt])
    else:
        block_r = block_r_for(max(r, 1))
    # split-K: S programs per output tile, each over its own run of whole K
    # blocks (no empty split), partials summed in order by the reduction
    k_blocks = cdiv(K, config.block_k)
    split_k = max(1, min(config.split_k, k_blocks))
    blocks_per_split = cdiv(k_blocks, split_k)
    if split_k > 1:
        split_k = cdiv(k_blocks, blocks_per_split)
    constexprs = types.MappingProxyType(dict(
        HAS_BIAS=has_bias,
        LOW_RANK=low_rank,
        LR_DROPOUT=low_rank != LOW_RANK_NONE and dropout and not shrink_dropout,
        SHRINK_DROPOUT=shrink_dropout,
        ROW_SCALE=row_scale,
        ADAPTERS=adapters,
        ROW_P=row_p,
        B_SCALE=b_scale,
        B_GROUP=b_group,
        UPCAST=upcast,
        INPUT_PRECISION=input_precision,
        EVEN_K=K % config.block_k == 0,
        # (The in-loop shrink reads its rank factor along K, where the rank
        # mask costs no vector width; Triton 3.9 spilled 8 B on the 16x64 fp32
        # tile with the flag on: compile report.)
        EVEN_R=r % block_r == 0 and low_rank != LOW_RANK_IN_LOOP,
        ONE_R_TILE=r <= block_r,
        BLOCK_R=block_r,
        **config.launch_kwargs(),
    ))
    return _LaunchShape(block_r, split_k, blocks_per_split, cdiv(M * N, 16) * 16, cdiv(M * r, 16) * 16,
                        cdiv(M, config.block_m) * cdiv(N, config.block_n), constexprs)


def _tma_view(t: torch.Tensor, stride_unit: int):
    """``(rows, cols, row_stride, transposed)``: ``t`` or ``t.T`` as TMA reads
    it (row-major, unit column stride), or None where TMA cannot read ``t``:
    the base must be 16-byte aligned, one stride 1 and the other a multiple
    of 16 bytes (and of ``stride_unit`` elements: see
    INTERPRETER_STRIDES_IN_ELEMENTS). A column-major ``t`` is described
    through ``t.T``. (Plain integers, no views made: the host's time per
    launch.)"""
    if t.data_ptr() % 16:
        return None
    e = t.element_size()
    (rows, cols), (s0, s1) = t.shape, t.stride()
    if s1 == 1 and (s0 * e) % 16 == 0 and s0 % stride_unit == 0 and s0 >= cols:
        return rows, cols, s0, False
    if s0 == 1 and (s1 * e) % 16 == 0 and s1 % stride_unit == 0 and s1 >= rows:
        return cols, rows, s1, True
    return None


def _stride_unit() -> int:
    return 16 if INTERPRETER_STRIDES_IN_ELEMENTS and is_interpreted(lora_gemm_kernel) else 1


def _described(t: torch.Tensor, view, block_rows: int, block_cols: int):
    """``(descriptor, transposed)`` of ``t`` through its :func:`_tma_view`
    ``view``. The descriptor's base is ``t`` itself, its shape and strides
    those of the view TMA reads (a descriptor takes only the base's address
    and dtype)."""
    rows, cols, row_stride, trans = view
    block = [block_cols, block_rows] if trans else [block_rows, block_cols]
    # (positional: the fields both Triton 3.6 and 3.9 have)
    return TensorDescriptor(t, [rows, cols], [row_stride, 1], block), trans


def _operand_views(a: torch.Tensor, b: torch.Tensor):
    """``(a's, b's)`` :func:`_tma_view`, or None unless TMA can read both
    (the kernel then uses pointers for both)."""
    if not tma_available():
        return None
    unit = _stride_unit()
    va = _tma_view(a, unit)
    vb = _tma_view(b, unit) if va is not None else None
    return None if vb is None else (va, vb)


def tma_descriptors(a: torch.Tensor, b: torch.Tensor, config: GemmConfig):
    """``(a_desc, a_transposed, b_desc, b_transposed)`` when both operands can
    be read through TMA, else None."""
    views = _operand_views(a, b)
    if views is None:
        return None
    return (*_described(a, views[0], config.block_m, config.block_k),
            *_described(b, views[1], config.block_k, config.block_n))


def _device_descriptors(a: torch.Tensor, b: torch.Tensor):
    """``(None, a_transposed, None, b_transposed)`` where the kernel can make
    both operands' descriptors itself (where :func:`tma_descriptors` would
    make them on the host), else None; on a GPU, Triton's allocator set."""
    views = _operand_views(a, b)
    if views is None:
        return None
    if a.is_cuda:
        ensure_allocator()
    return None, views[0][3], None, views[1][3]


def _torch_scratch(size: int, alignment: int, stream):
    """A launch's global scratch from torch's caching allocator, on the
    current device and stream (the launch's; inside a CUDA graph's capture,
    from the graph's pool). Its blocks are 512-byte aligned."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Triton's allocator (the global scratch of kernels that make tensor
    descriptors, ``TMA_DEVICE``) set to torch's caching allocator where this
    context has none: Triton keeps it in a ContextVar, which a thread starts
    without (autograd's device threads run the backward). One the user set is
    kept."""
    try:
        current = triton.runtime._allocation._allocator.get()
        unset = isinstance(current, triton.runtime._allocation.NullAllocator)
    except AttributeError:  # (another Triton's internals: set it)
        unset = True
    if unset:
        triton.set_allocator(_torch_scratch)


def tma_readable(*operands: torch.Tensor) -> bool:
    """Whether TMA can read every one of these 2-D GEMM operands (as
    :func:`tma_descriptors` would, whatever the tiles), so that a launch with
    TMA on reads them through descriptors, not pointers."""
    return tma_available() and all(_tma_view(t, _stride_unit()) is not None for t in operands)


def tma_available() -> bool:
    """Host-side tensor descriptors exist in this Triton (3.4 and later)."""
    return TensorDescriptor is not None
