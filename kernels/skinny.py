"""The skinny pass: one memory-bound read of a wide (M, C) operand T that
produces every rank-r product the LoRA passes need from it, plus the
deterministic reduction of its split partials.

=============  ==========  ===========================  ==========================  ============
pass           T (M, C)    SHRINK: T·S (M, r)           TN: Lᵀ·T (r, C)             COLSUM
=============  ==========  ===========================  ==========================  ============
forward        drop(x)     xa = w ⊙ drop(x)·Aᵀ          -                           -
backward dy    dy          g = s·w ⊙ dy·B               dBᵀ = s·xaᵀ·dy              db = Σ dy
backward dA    drop(x)     -                            dA = gᵀ·drop(x)             -
=============  ==========  ===========================  ==========================  ============

``drop(x)`` is never stored: the keep-mask is regenerated from the seed as the
x tiles are loaded (see :func:`fused_lora.kernels.common.keep_mask`).
``w``: the optional row scale (``ROW_SCALE``) and adapters' columns
(``ADAPTERS``: :class:`fused_lora.kernels.common.AdapterColumns`), applied as
SHRINK's product is stored.

A program covers ``rows_per_prog`` rows and ``c_tiles_per_prog`` column tiles
of T (whole ``BLOCK_C`` tiles, so that the loads stay 16-byte vectors), walking
column tiles outermost and row tiles innermost, so that the TN and
COLSUM partials of its column tile stay in registers. The SHRINK product needs
all columns of a row, so with SHRINK on a program covers exactly one row tile,
walked along its columns in one software-pipelined loop (``SHRINK_STAGES``),
each column tile's TN and COLSUM partials stored as it is done.
Partials are written per program (never accumulated with atomics) and summed
in a fixed order by :func:`reduce_partials_kernel`, two sums a launch: results
are bitwise reproducible. Where one row split covers all rows (small M), its
TN and COLSUM partials are the sums: stored as the outputs, no reduction.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (AdapterColumns, DropoutRows, adapter_columns, alloc, check_adapter_columns, check_dropout_rows,
                     check_row_scale, in_bounds, is_interpreted, keep_mask, load_operand, load_seed,
                     mask_counters_int64, rows_dropout_p, seed_arg)
from .launch import launch
from .configs import (
    REDUCE_BLOCK,
    REDUCE_LAUNCH,
    SKINNY_PARTIAL_BYTES,
    SkinnyConfig,
    block_r_for,
    cdiv,
)


# The row and column counts and ranges are not specialised (the token count
# changes between batches; the column loop's bounds are whole tiles: c_lo
# below); the rank R is, as Triton does by default: a rank mask of unknown
# granularity made the rank tail's S and L loads 2- and 4-byte accesses
# (compile report, sm_90, r = 32 in a 64 tile).
@triton.jit(do_not_specialize=["M", "C", "m_start", "m_end", "rows_per_prog", "c_tiles_per_prog", "seed"])
def lora_skinny_kernel(
    # pointers
    t_ptr,  # (M, C)  the wide operand, read once
    s_ptr,  # (C, R)  SHRINK right factor (forward: Aᵀ, backward: B)
    l_ptr,  # (M, R)  fp32 TN left factor (xa for dB, g for dA)
    sh_ptr,  # (SPLIT_C, M, R) fp32 SHRINK partials, one per column split
    tn_ptr,  # (SPLIT_M, ...) fp32 TN partials, one per row split; element (c, r) via strides
    cs_ptr,  # (SPLIT_M, C) fp32 COLSUM partials (with one row split, TN's and COLSUM's outputs themselves)
    w_ptr,  # (M,)    fp32 row scale of the SHRINK product when ROW_SCALE
    ids_ptr,  # (M,)    int32 adapter of each row when ADAPTERS
    cid_ptr,  # (R,)    int32 adapter of each rank column when ADAPTERS (contiguous)
    csc_ptr,  # (R,)    fp32 scale of each rank column when ADAPTERS (contiguous)
    drp_ptr,  # (n,)    fp32 dropout probability of each adapter when ROW_P (row m's: drp[ids[m]])
    # sizes
    M, C, R,
    m_start, m_end,  # the rows of this launch (global indices: the mask and SHRINK use them)
    rows_per_prog,
    c_tiles_per_prog,  # a program covers this many BLOCK_C column tiles
    # strides
    stride_tm, stride_tc,
    stride_sc, stride_sr,
    stride_lm, stride_lr,
    stride_shp, stride_shm, stride_shr,
    stride_tnp, stride_tnc, stride_tnr,
    stride_csp,
    stride_w,
    stride_ids,
    # scalars
    sh_scale,  # multiplies the SHRINK partial
    tn_scale,  # multiplies the TN partial
    p, seed,  # dropout of T's elements (DROPOUT): keep(seed, m, c, C, p), see common.keep_mask
    # (seed: the value, or a one-element int32 tensor holding it, see common.load_seed)
    # meta-parameters
    SHRINK: tl.constexpr, TN: tl.constexpr, COLSUM: tl.constexpr,
    ROW_SCALE: tl.constexpr,  # SHRINK's row m times w[m]
    ADAPTERS: tl.constexpr,  # SHRINK's (m, j) kept times csc[j] where ids[m] == cid[j], else 0 (common.adapter_columns)
    DROPOUT: tl.constexpr, OFFSET_INT64: tl.constexpr, UPCAST: tl.constexpr,
    ROW_P: tl.constexpr,  # DROPOUT's row m with its adapter's probability drp[ids[m]], not p (common.DropoutRows)
    EVEN_C: tl.constexpr,  # C % BLOCK_C == 0: no column mask (vector loads)
    EVEN_R: tl.constexpr,  # R % BLOCK_R == 0: no rank mask (vector loads of S and L)
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    SHRINK_STAGES: tl.constexpr,  # pipeline stages of SHRINK's column loop (the launch's num_stages: the rows')
):
    """Partials of [w ⊙] T·S, Lᵀ·T and Σ_m T over this program's rows and columns,
    with T = T ⊙ keep when DROPOUT (the 1/(1-p) is folded into the scales)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    if DROPOUT:
        seed = load_seed(seed)
    m_lo = m_start + pid_m * rows_per_prog
    m_hi = min(m_lo + rows_per_prog, m_end)
    # In whole tiles, so that the compiler knows c_lo's alignment: with EVEN_C
    # (no column mask) the T loads are then 16-byte vectors. (With an
    # unspecialised column count here, or a column mask of unknown
    # granularity, every element was its own 2-byte load: sm_90 SASS.)
    c_lo = pid_c * (c_tiles_per_prog * BLOCK_C)
    c_hi = min(c_lo + c_tiles_per_prog * BLOCK_C, C)
    offs_r = tl.arange(0, BLOCK_R)
    r_in = in_bounds(offs_r, R, EVEN_R)

    if SHRINK:
        # One row tile (the launcher guarantees rows_per_prog == BLOCK_M), walked along its
        # columns in one loop: the loop Triton software-pipelines (the T and S tiles of the next
        # column tiles load while this one computes) is this one. (In the nest below, with a
        # single row tile its inner loop made one trip: nothing overlapped the loads.)
        offs_m = m_lo + tl.arange(0, BLOCK_M)
        m_in = offs_m < m_hi
        p_rows = rows_dropout_p(p, drp_ptr, ids_ptr, offs_m, m_in, stride_ids, ROW_P)
        if TN:
            lt = left_tile_t(l_ptr, offs_m, m_in, offs_r, r_in, stride_lm, stride_lr)
        sh_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for c0 in tl.range(c_lo, c_hi, BLOCK_C, num_stages=SHRINK_STAGES):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_in = in_bounds(offs_c, c_hi, EVEN_C)
            s = load_operand(s_ptr + offs_c[:, None].to(tl.int64) * stride_sc + offs_r[None, :] * stride_sr,
                             c_in[:, None] & r_in[None, :], UPCAST)
            t = dropped_tile(t_ptr, offs_m, m_in, offs_c, c_in, stride_tm, stride_tc, c0, C, p_rows, seed,
                             DROPOUT, OFFSET_INT64, UPCAST, BLOCK_C)
            sh_acc = tl.dot(t, s, sh_acc, input_precision=INPUT_PRECISION)
            if TN:
                tn = tl.dot(lt.to(t.dtype), t, tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32),
                            input_precision=INPUT_PRECISION)
                store_tn(tn_ptr, tn * tn_scale, pid_m, offs_c, c_in, offs_r, r_in, stride_tnp, stride_tnc,
                         stride_tnr)
            if COLSUM:
                # (added to zeros as in the nest: a column of -0.0 sums to +0.0 on either path)
                store_colsum(cs_ptr, tl.zeros((BLOCK_C,), dtype=tl.float32) + tl.sum(t.to(tl.float32), axis=0),
                             pid_m, offs_c, c_in, stride_csp)
        sh_acc = sh_acc * sh_scale
        if ADAPTERS:
            sh_acc = adapter_columns(sh_acc, ids_ptr, cid_ptr, csc_ptr, offs_m, m_in, offs_r, r_in, stride_ids)
        if ROW_SCALE:  # (never with ADAPTERS: the launcher takes one or the other)
            # (each column split scales its own partial: the sum of the splits is scaled alike)
            sh_acc = sh_acc * tl.load(w_ptr + offs_m.to(tl.int64) * stride_w, mask=m_in, other=0.0)[:, None]
        sh_ptrs = (sh_ptr + pid_c.to(tl.int64) * stride_shp + offs_m[:, None].to(tl.int64) * stride_shm
                   + offs_r[None, :] * stride_shr)
        tl.store(sh_ptrs, sh_acc, mask=m_in[:, None] & r_in[None, :])
    else:
        # Column tiles outermost, the program's row tiles innermost (the pipelined loop), so that the
        # TN and COLSUM partials of a column tile stay in registers.
        for c0 in range(c_lo, c_hi, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_in = in_bounds(offs_c, c_hi, EVEN_C)
            if TN:
                tn_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            if COLSUM:
                cs_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for m0 in range(m_lo, m_hi, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                m_in = offs_m < m_hi
                t = dropped_tile(t_ptr, offs_m, m_in, offs_c, c_in, stride_tm, stride_tc, c0, C,
                                 rows_dropout_p(p, drp_ptr, ids_ptr, offs_m, m_in, stride_ids, ROW_P), seed,
                                 DROPOUT, OFFSET_INT64, UPCAST, BLOCK_C)
                if TN:
                    lt = left_tile_t(l_ptr, offs_m, m_in, offs_r, r_in, stride_lm, stride_lr)
                    tn_acc = tl.dot(lt.to(t.dtype), t, tn_acc, input_precision=INPUT_PRECISION)
                if COLSUM:
                    cs_acc += tl.sum(t.to(tl.float32), axis=0)
            if TN:
                store_tn(tn_ptr, tn_acc * tn_scale, pid_m, offs_c, c_in, offs_r, r_in, stride_tnp, stride_tnc,
                         stride_tnr)
            if COLSUM:
                store_colsum(cs_ptr, cs_acc, pid_m, offs_c, c_in, stride_csp)


@triton.jit
def dropped_tile(t_ptr, offs_m, m_in, offs_c, c_in, stride_tm, stride_tc, c0, C, p_rows, seed,
                 DROPOUT: tl.constexpr, OFFSET_INT64: tl.constexpr, UPCAST: tl.constexpr, BLOCK_C: tl.constexpr):
    """T's tile (offs_m, offs_c), times its keep-mask when DROPOUT (``p_rows``:
    :func:`~fused_lora.kernels.common.rows_dropout_p` of its rows)."""
    t = load_operand(t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + offs_c[None, :].to(tl.int64) * stride_tc,
                     m_in[:, None] & c_in[None, :], UPCAST)
    if DROPOUT:
        # Multiply (not select) so that NaN/Inf propagate as in x * mask.
        t = t * keep_mask(seed, offs_m, c0, C, p_rows, BLOCK_C, OFFSET_INT64).to(t.dtype)
    return t


@triton.jit
def left_tile_t(l_ptr, offs_m, m_in, offs_r, r_in, stride_lm, stride_lr):
    """Lᵀ's (BLOCK_R, BLOCK_M) tile, loaded through transposed pointers: staged
    that way, the copies are 16 bytes (loading L's tile and transposing it in
    registers made them 4)."""
    return tl.load(l_ptr + offs_m[None, :].to(tl.int64) * stride_lm + offs_r[:, None] * stride_lr,
                   mask=r_in[:, None] & m_in[None, :], other=0.0)


@triton.jit
def store_colsum(cs_ptr, cs, pid_m, offs_c, c_in, stride_csp):
    """Store a (BLOCK_C,) COLSUM partial of row split ``pid_m``."""
    tl.store(cs_ptr + pid_m.to(tl.int64) * stride_csp + offs_c, cs.to(cs_ptr.dtype.element_ty), mask=c_in)


@triton.jit
def store_tn(tn_ptr, tn, pid_m, offs_c, c_in, offs_r, r_in, stride_tnp, stride_tnc, stride_tnr):
    """Store a (BLOCK_R, BLOCK_C) TN partial of row split ``pid_m``."""
    tn_ptrs = (tn_ptr + pid_m.to(tl.int64) * stride_tnp + offs_c[None, :].to(tl.int64) * stride_tnc
               + offs_r[:, None] * stride_tnr)
    tl.store(tn_ptrs, tn.to(tn_ptr.dtype.element_ty), mask=r_in[:, None] & c_in[None, :])


@triton.jit
def ordered_sum(part_ptr, acc_ptr, out_ptr, block, P, numel, stride_p,
                HAS_ACC: tl.constexpr, EVEN: tl.constexpr, BLOCK: tl.constexpr):
    """Block ``block`` of out = acc + Σ_p part[p], summed in order p = 0, 1, ..."""
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = None if EVEN else offs < numel
    if HAS_ACC:
        total = load_operand(acc_ptr + offs, mask, False)
    else:
        total = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + offs
    for _ in range(0, P):
        total += load_operand(ptrs, mask, False)
        ptrs += stride_p  # pointer arithmetic: 64-bit, whatever P * numel is
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


# The first reduction's stride between partials is specialised (its
# divisibility by 16 lets the loads be 16-byte vectors; the split-K workspace
# pads every partial to 16 elements). The second is the smaller one, always
# masked (scalar loads): nothing of it is specialised, so pairs of any sizes
# share a handful of compiled variants.
@triton.jit(do_not_specialize=["P", "numel", "P2", "numel2", "stride_p2", "blocks"])
def reduce_partials_kernel(
    part_ptr,  # (P, numel) fp32, contiguous rows, stride_p elements apart
    acc_ptr,  # (numel,) fp32 running sum to add to when HAS_ACC
    out_ptr,  # (numel,) output, any float dtype
    P, numel, stride_p,
    part2_ptr, acc2_ptr, out2_ptr,  # a second, independent reduction (SECOND), as above, always masked
    P2, numel2, stride_p2,
    blocks,  # programs of the first reduction; the rest do the second
    HAS_ACC: tl.constexpr,
    EVEN: tl.constexpr,  # numel % BLOCK == 0: no mask (vector loads and stores)
    HAS_ACC2: tl.constexpr,
    SECOND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = acc + Σ_p part[p], summed in order p = 0, 1, ... (deterministic);
    with SECOND, out2 likewise in the same launch (one launch fewer)."""
    pid = tl.program_id(0)
    if SECOND:
        if pid < blocks:
            ordered_sum(part_ptr, acc_ptr, out_ptr, pid, P, numel, stride_p, HAS_ACC, EVEN, BLOCK)
        else:
            ordered_sum(part2_ptr, acc2_ptr, out2_ptr, pid - blocks, P2, numel2, stride_p2, HAS_ACC2, False,
                        BLOCK)
    else:
        ordered_sum(part_ptr, acc_ptr, out_ptr, pid, P, numel, stride_p, HAS_ACC, EVEN, BLOCK)


def _check_partials(parts: torch.Tensor, out: torch.Tensor) -> None:
    if (parts.shape[1:] != out.shape or not out.is_contiguous() or parts.dtype != torch.float32
            or (parts.shape[0] and not parts[0].is_contiguous())):
        raise ValueError(f"reduce_partials: parts {tuple(parts.shape)} do not match out {tuple(out.shape)}")


def reduce_partials(parts: torch.Tensor, out: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """``out[...] = acc + parts.sum(0)`` in a fixed order; ``parts`` is fp32
    (P, *out.shape), each ``parts[p]`` contiguous (the partials may be
    further apart than their size); ``out`` contiguous."""
    reduce_all([(parts, out, acc)])
    return out


def reduce_all(jobs) -> None:
    """:func:`reduce_partials` of each ``(parts, out, acc)`` job (``acc`` may
    be None), two jobs a launch, the larger first (the first's loads are
    vectors when its size is a whole number of blocks)."""
    jobs = list(jobs)
    for parts, out, _ in jobs:
        _check_partials(parts, out)
    launch_reductions(jobs)


def launch_reductions(jobs) -> None:
    """:func:`reduce_all` without its checks, for the launchers' own partials
    (allocated to fit: the checks would only add host time to every call)."""
    jobs = sorted((job for job in jobs if job[1].numel()), key=lambda job: -job[0].numel())
    for i in range(0, len(jobs), 2):
        (parts, out, acc), second = jobs[i], jobs[i + 1] if i + 1 < len(jobs) else None
        parts2, out2, acc2 = second if second is not None else (parts, out, None)
        numel, numel2 = out.numel(), (out2.numel() if second is not None else 0)
        grid, blocks, constexprs = _reduction_shape(numel, numel2, acc is not None, acc2 is not None,
                                                    second is not None)
        launch(reduce_partials_kernel, grid, (
            parts, acc if acc is not None else parts, out, parts.shape[0], numel, parts.stride(0),
            parts2, acc2 if acc2 is not None else parts2, out2, parts2.shape[0], numel2, parts2.stride(0),
            blocks), constexprs)


@functools.lru_cache(maxsize=4096)  # (host time per call: the same shapes come back every step)
def _reduction_shape(numel: int, numel2: int, has_acc: bool, has_acc2: bool, second: bool):
    """``(grid, blocks, constexprs)`` of one reduction launch (``blocks``:
    the first reduction's programs)."""
    blocks = cdiv(numel, REDUCE_BLOCK)
    constexprs = types.MappingProxyType(dict(
        HAS_ACC=has_acc, EVEN=numel % REDUCE_BLOCK == 0, HAS_ACC2=has_acc2, SECOND=second, BLOCK=REDUCE_BLOCK,
        **REDUCE_LAUNCH))
    return (blocks + cdiv(numel2, REDUCE_BLOCK),), blocks, constexprs


def _launch(t, s, l, sh, tn, cs, w, adapters, m_start, m_end, rows_per_prog, cols_per_prog, grid, *, sh_scale,
            tn_scale, dropout_p, seed, config, input_precision, dropout_rows=None):
    M, C = t.shape
    r = s.shape[1] if s is not None else l.shape[1] if l is not None else 0  # (0: a column sum alone)
    dummy = t
    row_p = dropout_rows is not None and dropout_p > 0.0
    launch(lora_skinny_kernel, grid, (
        t, s if s is not None else dummy, l if l is not None else dummy,
        sh if sh is not None else dummy, tn if tn is not None else dummy, cs if cs is not None else dummy,
        w if w is not None else dummy,
        *(adapters if adapters is not None else (dropout_rows.row_ids if row_p else dummy, dummy, dummy)),
        dropout_rows.p if row_p else dummy,
        M, C, r, m_start, m_end, rows_per_prog, cols_per_prog // config.block_c,
        *t.stride(),
        *(s.stride() if s is not None else (0, 0)),
        *(l.stride() if l is not None else (0, 0)),
        *(sh.stride() if sh is not None else (0, 0, 0)),
        *(tn.stride() if tn is not None else (0, 0, 0)),
        cs.stride(0) if cs is not None else 0,
        w.stride(0) if w is not None else 0,
        adapters.row_ids.stride(0) if adapters is not None else dropout_rows.row_ids.stride(0) if row_p else 0,
        float(sh_scale), float(tn_scale), float(dropout_p), seed_arg(seed, t.device),
    ), dict(
        OFFSET_INT64=mask_counters_int64(M, C),
        **_launch_constexprs(C, r, s is not None, l is not None, cs is not None, w is not None,
                             adapters is not None, dropout_p > 0.0, row_p,
                             is_interpreted(lora_skinny_kernel) and t.dtype == torch.bfloat16, input_precision,
                             config, t.element_size()),
    ))


@functools.lru_cache(maxsize=4096)  # (host time per call: the same shapes come back every step)
def _launch_constexprs(C: int, r: int, shrink: bool, tn: bool, colsum: bool, row_scale: bool, adapters: bool,
                       dropout: bool, row_p: bool, upcast: bool, input_precision: str, config: SkinnyConfig,
                       elt: int):
    block_r = block_r_for(r, config.max_block_r)
    return types.MappingProxyType(dict(
        SHRINK=shrink, TN=tn, COLSUM=colsum, ROW_SCALE=row_scale, ADAPTERS=adapters,
        DROPOUT=dropout,
        ROW_P=row_p,
        UPCAST=upcast,
        EVEN_C=C % config.block_c == 0,
        EVEN_R=r % block_r == 0,
        INPUT_PRECISION=input_precision,
        BLOCK_R=block_r,
        **config.launch_kwargs(elt, block_r),
    ))


@dataclass(frozen=True)
class SkinnyGrid:
    """How :func:`skinny_pass` splits an (M, C) operand over its programs."""

    M: int
    rows_per_prog: int
    cols_per_prog: int
    split_c: int  # column splits (SHRINK's partials)
    chunk_rows: int  # rows a launch (all of M unless the TN/COLSUM partials would pass SKINNY_PARTIAL_BYTES)
    shrink: bool
    row_sums: int  # TN and COLSUM: sums over the rows

    @property
    def direct(self) -> bool:
        """One row split covers every row: its TN and COLSUM partials are the
        sums, stored as the outputs (no reduction)."""
        return self.rows_per_prog >= self.M

    def launches(self) -> int:
        """Kernel launches of the pass (a rank within one rank tile): one a
        chunk of rows, plus its reductions (two sums a launch; SHRINK's with
        the last chunk's)."""
        if self.M == 0:
            return 0
        chunks = cdiv(self.M, self.chunk_rows)
        row_sums = 0 if self.direct else self.row_sums
        last = row_sums + (self.shrink and self.split_c > 1)
        return chunks + (chunks - 1) * cdiv(row_sums, 2) + cdiv(last, 2)

    def small_bytes(self, C: int, r: int, tn_elt: int | None, cs_elt: int | None = None
                    ) -> tuple[list[int], list[int]]:
        """Bytes that the pass's small results move beside its read of the
        wide operand, as :func:`skinny_pass` launches them (``tn_elt``,
        ``cs_elt``: TN's and COLSUM's output element sizes, None where the
        pass has none; :attr:`row_sums` must count them): ``(written by each
        launch over a chunk of rows, read and written by each reduction
        launch)``, in launch order. SHRINK's fp32 (M, r) partials, one a
        column split; TN's fp32 (C, r) and COLSUM's (C,) partials, one a row
        split (or, with one row split, the outputs themselves); a chunk's
        running sums in fp32 for the next. (The rank factors' reads, small
        and shared by the programs, are not counted.)"""
        if (tn_elt is not None) + (cs_elt is not None) != self.row_sums:
            raise ValueError(f"row_sums={self.row_sums} but tn_elt={tn_elt}, cs_elt={cs_elt}")
        sums = [(n, elt) for n, elt in ((C * r, tn_elt), (C, cs_elt)) if elt is not None]  # (elements, out size)
        launches, reductions = [], []
        for m0 in range(0, self.M, self.chunk_rows):
            rows = min(self.M, m0 + self.chunk_rows) - m0
            splits = cdiv(rows, self.rows_per_prog)
            last = m0 + rows == self.M
            written = 4 * self.split_c * rows * r if self.shrink else 0
            written += sum(n * (elt if self.direct else 4 * splits) for n, elt in sums)
            launches.append(written)
            jobs = [] if self.direct else [  # (parts, moved): as launch_reductions pairs them, largest first
                (splits * n, 4 * splits * n + (4 * n if m0 else 0) + n * (elt if last else 4)) for n, elt in sums]
            if last and self.shrink and self.split_c > 1:
                jobs.append((self.split_c * self.M * r, 4 * (self.split_c + 1) * self.M * r))
            jobs.sort(key=lambda job: -job[0])
            reductions += [sum(moved for _, moved in jobs[i:i + 2]) for i in range(0, len(jobs), 2)]
        return launches, reductions


def skinny_grid(M: int, C: int, r: int, config: SkinnyConfig, target_programs: int, *, shrink: bool, tn: bool,
                colsum: bool) -> SkinnyGrid:
    """The split of one skinny pass (rank r within one rank tile) over about
    ``target_programs`` programs."""
    # (the bound read here, not frozen into the cache: tests lower it)
    return _skinny_grid(M, C, r, config, target_programs, shrink, tn, colsum, SKINNY_PARTIAL_BYTES)


@functools.lru_cache(maxsize=4096)  # (host time per call: the same shapes come back every step)
def _skinny_grid(M: int, C: int, r: int, config: SkinnyConfig, target_programs: int, shrink: bool, tn: bool,
                 colsum: bool, partial_bytes: int) -> SkinnyGrid:
    bm, bc = config.block_m, config.block_c
    m_tiles, c_tiles = max(1, cdiv(M, bm)), max(1, cdiv(C, bc))
    if shrink:
        # One row tile per program; split the columns until the grid is full.
        rows_per_prog = bm
        split_m = m_tiles
        split_c = max(1, min(c_tiles, cdiv(target_programs, m_tiles)))
    else:
        # One column tile per program; split the rows until the grid is full.
        split_c = c_tiles
        split_m = max(1, min(m_tiles, cdiv(target_programs, c_tiles)))
        rows_per_prog = cdiv(m_tiles, split_m) * bm
        split_m = cdiv(M, rows_per_prog)
    cols_per_prog = cdiv(c_tiles, split_c) * bc
    split_c = cdiv(C, cols_per_prog)
    # Bound the row-split partials: process the rows in chunks when needed.
    per_split = (C * r * 4 if tn else 0) + (C * 4 if colsum else 0)
    max_splits = max(1, partial_bytes // max(per_split, 1))
    splits_per_chunk = split_m if not (tn or colsum) else min(split_m, max_splits)
    return SkinnyGrid(M, rows_per_prog, cols_per_prog, split_c, max(1, splits_per_chunk * rows_per_prog), shrink,
                      int(tn) + int(colsum))


def skinny_pass(
    t: torch.Tensor,
    *,
    config: SkinnyConfig,
    target_programs: int,
    shrink: torch.Tensor | None = None,
    tn_left: torch.Tensor | None = None,
    colsum: bool = False,
    sh_scale: float = 1.0,
    row_scale: torch.Tensor | None = None,
    adapters: AdapterColumns | None = None,
    dropout_rows: DropoutRows | None = None,
    tn_scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor = 0,
    tn_transposed: bool = False,
    tn_dtype: torch.dtype | None = None,
    colsum_dtype: torch.dtype | None = None,
    input_precision: str = "ieee",
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One read of ``t`` (M, C); returns ``(sh, tn, cs)``:

    * ``sh = sh_scale * drop(t) @ shrink`` — fp32 (M, r), when ``shrink`` (C, r) is given;
      with ``row_scale`` (M,) fp32, its row m times ``row_scale[m]``; with
      ``adapters`` (:class:`~fused_lora.kernels.common.AdapterColumns`), its
      columns kept on the rows of their adapters;
    * ``tn = tn_scale * tn_left.T @ drop(t)`` — (r, C), or its transpose (C, r)
      with ``tn_transposed``, in ``tn_dtype``, when ``tn_left`` (M, r) fp32 is given;
    * ``cs = drop(t).sum(0)`` — (C,) in ``colsum_dtype``, when ``colsum``.

    ``drop(t) = t ⊙ keep(seed, p)`` (the caller folds 1/(1-p) into the scales);
    with ``dropout_rows`` (:class:`~fused_lora.kernels.common.DropoutRows`)
    each row's keep-mask drawn with its adapter's probability.
    """
    M, C = t.shape
    dev = t.device
    check_row_scale("skinny_pass", row_scale, shrink, M)  # (SHRINK's rows)
    check_adapter_columns("skinny_pass", adapters, shrink, M, row_scale)
    check_dropout_rows("skinny_pass", dropout_rows, M, adapters)
    r = shrink.shape[1] if shrink is not None else (tn_left.shape[1] if tn_left is not None else 0)
    tn_dtype = tn_dtype or torch.float32
    colsum_dtype = colsum_dtype or torch.float32
    sh_out = alloc((M, r), torch.float32, dev) if shrink is not None else None
    tn_out = None
    if tn_left is not None:
        tn_out = alloc((C, r) if tn_transposed else (r, C), tn_dtype, dev)
    cs_out = alloc((C,), colsum_dtype, dev) if colsum else None

    if M == 0 or C == 0:
        for o in (sh_out, tn_out, cs_out):
            if o is not None:
                o.zero_()
        return sh_out, tn_out, cs_out

    # Ranks above one rank tile: one launch per rank chunk (each reads t again).
    if r > config.max_block_r:
        for r0 in range(0, r, config.max_block_r):
            r1 = min(r, r0 + config.max_block_r)
            sh_c, tn_c, cs_c = skinny_pass(
                t, config=config, target_programs=target_programs,
                shrink=shrink[:, r0:r1] if shrink is not None else None,
                tn_left=tn_left[:, r0:r1] if tn_left is not None else None,
                colsum=colsum and r0 == 0, sh_scale=sh_scale, row_scale=row_scale,
                adapters=adapters.columns(r0, r1) if adapters is not None else None, tn_scale=tn_scale,
                dropout_rows=dropout_rows, dropout_p=dropout_p, seed=seed, tn_transposed=tn_transposed, tn_dtype=tn_dtype,
                colsum_dtype=colsum_dtype, input_precision=input_precision)
            if sh_c is not None:
                sh_out[:, r0:r1] = sh_c
            if tn_c is not None:
                if tn_transposed:
                    tn_out[:, r0:r1] = tn_c
                else:
                    tn_out[r0:r1] = tn_c
            if cs_c is not None:
                cs_out.copy_(cs_c)
        return sh_out, tn_out, cs_out

    grid = skinny_grid(M, C, r, config, target_programs, shrink=shrink is not None, tn=tn_left is not None,
                       colsum=colsum)
    rows_per_prog, cols_per_prog, split_c, chunk_rows = (grid.rows_per_prog, grid.cols_per_prog, grid.split_c,
                                                         grid.chunk_rows)

    sh_parts = None
    if shrink is not None:
        sh_parts = sh_out.unsqueeze(0) if split_c == 1 else alloc((split_c, M, r), torch.float32, dev)
    direct = grid.direct  # (one row split over all the rows: its partials are the sums)
    tn_acc = cs_acc = None
    for m0 in range(0, M, chunk_rows):
        m1 = min(M, m0 + chunk_rows)
        n_splits = cdiv(m1 - m0, rows_per_prog)
        tn_parts = cs_parts = None
        if tn_left is not None:
            # Partials in the final layout, so that the reduction is a flat sum.
            tn_parts = tn_out.unsqueeze(0) if direct else alloc((n_splits,) + tuple(tn_out.shape), torch.float32, dev)
            tn_view = tn_parts if tn_transposed else tn_parts.transpose(1, 2)  # element (p, c, r)
        if colsum:
            cs_parts = cs_out.unsqueeze(0) if direct else alloc((n_splits, C), torch.float32, dev)
        _launch(t, shrink, tn_left, sh_parts, tn_view if tn_left is not None else None, cs_parts, row_scale,
                adapters, m0, m1, rows_per_prog, cols_per_prog, (n_splits, split_c),
                sh_scale=sh_scale, tn_scale=tn_scale, dropout_p=dropout_p, seed=seed,
                config=config, input_precision=input_precision, dropout_rows=dropout_rows)
        last = m1 == M
        jobs = []  # this chunk's reductions (two a launch; the last chunk's with SHRINK's)
        if tn_parts is not None and not direct:
            tn_target = tn_out if last else alloc(tn_out.shape, torch.float32, dev)
            jobs.append((tn_parts, tn_target, tn_acc))
            tn_acc = None if last else tn_target
        if cs_parts is not None and not direct:
            cs_target = cs_out if last else alloc((C,), torch.float32, dev)
            jobs.append((cs_parts, cs_target, cs_acc))
            cs_acc = None if last else cs_target
        if last and sh_parts is not None and split_c > 1:
            jobs.append((sh_parts, sh_out, None))
        launch_reductions(jobs)
    return sh_out, tn_out, cs_out
