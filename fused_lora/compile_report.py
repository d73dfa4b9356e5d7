"""Compile every shipped kernel configuration for a GPU target, without a GPU.

    python -m fused_lora.compile_report            # sm_90 and sm_80, a table
    python -m fused_lora.compile_report --json     # the same, for machines
    python -m fused_lora.compile_report --arch 90 --jobs 2
    python -m fused_lora.compile_report --arch 90 --scope kernels   # each kernel on one tile

For each configuration of :mod:`fused_lora.kernels.configs`, each pass that
uses it and each rank tile the pass runs with (each is its own kernel; the
skinny passes also by the outputs they compute; TMA, the persistent grid and
TF32 as variants where they apply), the kernel is compiled with
``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` at a
representative large shape (M = N = K = 4096, contiguous, 16-byte aligned:
the specialisation the runtime would make; masked tails, a rank below its
tile, a forward without a bias and each row factor of the rank product
(``+row_scale``: a batch mixing the adapter and the base; ``+adapters``:
several adapters side by side, :func:`fused_lora.multi_lora_linear`;
``+row_p``: their dropout probabilities, one an adapter) on
one tile of each pass, or with
``--every-variant`` on every GEMM compiled), and
the report gives the shared memory, the registers and spills (from the log
of the ``ptxas -v`` that Triton itself runs to assemble the kernel: its own
ptxas, with its own flags), and whether the PTX issues ``wgmma``
(Hopper's tensor-core instruction; ``mma.sync`` is the pre-Hopper path).
The passes that draw a dropout mask are compiled as ``seed=None`` runs them,
reading a seed drawn on the GPU from memory, and, on the largest tile of
each, with the seed as a value (an explicit seed: ``+seed_value``) and with
the mask's counters in 64 bits (a masked matrix of 2**31 elements or more:
``+offset_int64``). fp16's GEMMs are compiled where they can differ from
bf16's (:data:`FP16_TWIN_REGISTER_MARGIN`). The tiles are those the dispatch
runs on that arch, pruned to its shared memory
(:func:`fused_lora.kernels.configs.smem_limit_for`: ``--arch 86`` compiles
what a 99 KiB GeForce/RTX/L4 part runs); on every arch a kernel over that
limit, or a GEMM over the estimate that prunes its tiles, is a problem.
Sizes of 1, which Triton compiles as constants, are compiled too: one token
(decoding: ``+one_token``) and a rank of 1 (``+rank_one``). A problem
understood and left is listed in :data:`KNOWN_PROBLEMS` with why, and
reported apart (the exit status is 1 only for the others): each is a spill
that ptxas takes to fit more programs on a SM, and ``--check-known``
compiles those kernels again to show it, still found as the report compiles
them and gone under a ceiling of 255 registers a thread.
``--scope kernels`` compiles each kernel on one tile, ``--scope paths`` at
one rank tile too, and fp16's sm_90 GEMMs and skinny passes only as twins
(:data:`SCOPES`). DoRA's norm (:mod:`fused_lora.kernels.dora`) is compiled
at every rank tile, with a K tail, and with a rank of several chunks; the
keep-mask pass (:mod:`fused_lora.kernels.mask`, strategy ``cublas`` with
dropout: a byte an element, whatever x's dtype, reported as ``u8``) with a
K tail, an explicit seed and 64-bit counters; the dequantisation kernel
(:mod:`fused_lora.kernels.dequant`: an NF4 base made whole at large M, or
an int8 one) into each dtype, with a K tail, NF4 in groups of 64 and 256.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import os
import re
import sys
from dataclasses import asdict, dataclass

SHAPE = 4096  # M = N = K of the representative problem


@dataclass(frozen=True)
class Job:
    kernel: str  # "gemm" | "skinny" | "reduce" | "norm" | "mask" | "dequant"
    pass_name: str  # which pass this variant serves
    dtype: str  # "bf16" | "fp16" | "fp32" ("u8": the keep-mask pass's output, whatever x's dtype)
    config: dict
    arch: int
    block_r: int = 16
    even_k: bool = True  # K (gemm) or C (skinny) a multiple of its block; False compiles the masked tail
    split_k: bool = False  # a split-K partial: fp32 output into the (S, M, N) workspace
    tma: bool = False  # A and B tiles through tensor descriptors (TMA)
    even_r: bool = True  # r a multiple of the rank tile; False compiles the masked rank (r = half the tile)
    persistent: bool = False  # a persistent grid (each program loops over tiles)
    # The dropout passes read their seed from device memory (seed=None: drawn on
    # the GPU, common.load_seed); True compiles them with the seed as a value
    # (an explicit seed) instead
    seed_value: bool = False
    tf32: bool = False  # fp32 dots in TF32 (torch.set_float32_matmul_precision("high")), else exact
    bias: bool = True  # the forward adds a bias (False: a layer without one, as Llama's)
    # The dropout mask's Philox counters in 64 bits, as the launchers set them
    # where the masked matrix has 2**31 elements or more (M·K, e.g. 524,288
    # tokens of a 4096-wide layer); the other passes ignore the switch
    offset_int64: bool = False
    # A row factor of the rank product the kernel makes (the in-loop shrink's
    # in the GEMM, SHRINK's in the skinny kernel): lora_linear's row scale (a
    # batch mixing the adapter and the base), or the adapters' ids and
    # columns (multi_lora_linear); the launchers take one or the other
    row_scale: bool = False
    adapters: bool = False
    # Several adapters each of its own dropout probability (multi_lora_linear's
    # dropout_p of one an adapter): a pass that draws a mask reads each row's
    # from its adapter's id (with the adapters' columns, or their ids alone)
    row_p: bool = False
    # An int8 base (lora_linear's weight_scale): the forward's and dx's B
    # tiles loaded as int8 and dequantised in the K loop (by column, by row)
    int8_base: bool = False
    # An NF4 base (a uint8 weight with its absmax): the forward's and dx's B
    # tiles loaded as bytes, each nibble's code times its group's absmax
    # (int8's tiles; never through TMA); the dequantisation kernel's NF4 in
    # groups of 64 (pass "dequantize") or 256 ("dequantize_wide_groups": a
    # group spanning the tile)
    nf4_base: bool = False
    # With TMA: the kernel makes the tensor descriptors itself (global scratch), none passed
    # (dispatch.set_tma_descriptors("device"))
    tma_device: bool = False
    # The precomputed low-rank term's rank in two tiles (a loop over R: a rank above
    # GEMM_LR_MAX_BLOCK_R), not one
    rank_loop: bool = False
    # A size of 1, which the runtime compiles as the constant 1 (Triton specialises an int
    # equal to 1): UNITS, "tokens" (one token, as in decoding: the GEMMs' M, dW's K) or
    # "rank" (r = 1: R, and the strides equal to it)
    unit: str = ""
    # The K loop warp-specialised, the precomputed term as rank-one updates after it: what
    # bench/gpu_probe.py's "+ws" rows launch (no plan runs it; --warp-specialized compiles it)
    warp_specialize: bool = False


#: The sizes :class:`Job` may set to 1, and the report's name of each.
UNITS = {"tokens": "+one_token", "rank": "+rank_one"}


@dataclass
class Result:
    kernel: str
    pass_name: str
    dtype: str
    arch: int
    config: dict
    block_r: int
    shared: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    wgmma: bool | None = None
    mma_sync: bool | None = None
    tma: bool | None = None  # the PTX issues TMA copies (cp.async.bulk.tensor)
    load_widths: list | None = None  # the widths of the global loads (ld.global, cp.async) in the PTX, bytes
    warp_specialized: bool | None = None  # the PTX sets the warps' registers apart (setmaxnreg): Triton's pass took it
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


_TORCH_OF = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _gemm_args(dtype: str, cfg, variant: str, block_r: int, even_k: bool = True, split_k: bool = False,
               tma: bool = False, even_r: bool = True, persistent: bool = False, seed_value: bool = False,
               precision: str = "ieee", bias: bool = True, offset_int64: bool = False,
               row_scale: bool = False, adapters: bool = False, int8_base: bool = False,
               nf4_base: bool = False, row_p: bool = False, tma_device: bool = False,
               rank_loop: bool = False, unit: str = "", warp_specialize: bool = False) -> dict:
    """Argument values of lora_gemm_kernel for one pass, as the launcher passes them
    (``even_r=False``: a rank of half the rank tile, e.g. r = 8 in a 16 tile;
    ``int8_base``: B, the forward's Wᵀ or dx's W, int8 with its fp32 scales;
    ``nf4_base``: NF4 with its fp32 absmax in groups of 64, W's (SHAPE,
    SHAPE / 2) bytes; ``tma_device``: with ``tma``, the descriptors made by
    the kernel, none passed; ``rank_loop``: the precomputed term's rank in two
    rank tiles, r = 2 tiles, or 1.5 with ``even_r=False``; ``unit``: a size
    of 1, :data:`UNITS`; ``warp_specialize``: as :func:`fused_lora.kernels.gemm.lora_gemm`
    launches it, its tiles through descriptors the kernel makes)."""
    s = SHAPE
    r = 1 if unit == "rank" else block_r if even_r else block_r // 2
    if rank_loop:
        r += block_r
    low_rank = {"forward_in_loop": 2, "forward_in_loop_dropout": 2, "forward_split": 1, "dx_in_loop": 2,
                "dx_in_loop_dropout": 2, "dx": 1, "dx_dropout": 1, "dw": 0}[variant]
    fwd = variant.startswith("forward")
    dropout = variant.endswith("_dropout")  # (the forward's mask is on the in-loop shrink's input, dx's on its term)
    if warp_specialize and (low_rank == 2 or dropout or int8_base or nf4_base or split_k or persistent
                            or cfg.num_warps != 4 or not (tma and tma_device)):
        raise ValueError(f"{variant}: lora_gemm runs no such warp-specialised kernel "
                         "(gemm._why_not_warp_specialized)")
    # With TMA: forward reads Wᵀ through W's descriptor (B_T), dW reads dyᵀ through dy's (A_T).
    a_t, b_t = tma and variant == "dw", tma and fwd
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    if (int8_base or nf4_base) and variant == "dw":
        raise ValueError("dW reads no weight: a quantized base has no dW pass")
    if nf4_base and tma:
        raise ValueError("an NF4 base is never read through TMA")
    b_dtype = "i8" if int8_base else "u8" if nf4_base else dtype
    # one token: M, or dW's K (its reduction runs over the tokens), a K tail of one element
    m = 1 if unit == "tokens" and variant != "dw" else s
    k = 1 if unit == "tokens" and variant == "dw" else s
    # (NF4: b is W's bytes, (K/2, N) forward, (N, K/2) dx; the absmax (N, K/64) in W's orientation)
    stride_bk, stride_bn = ((1, s // 2) if fwd else (s // 2, 1)) if nf4_base else ((1, s) if fwd else (s, 1))
    return dict(
        a_ptr=f"*{dtype}", b_ptr=f"*{b_dtype}",
        a_desc=f"tensordesc<{dtype}[{', '.join(map(str, [bk, bm] if a_t else [bm, bk]))}]>"
        if tma and not tma_device else None,
        b_desc=f"tensordesc<{b_dtype}[{', '.join(map(str, [bn, bk] if b_t else [bk, bn]))}]>"
        if tma and not tma_device else None,
        bias_ptr=f"*{dtype}", u_ptr="*fp32", s_ptr=f"*{dtype}",
        v_ptr=f"*{dtype}", c_ptr="*fp32" if split_k else f"*{dtype}", xa_ptr="*fp32", w_ptr="*fp32",
        ids_ptr="*i32", cid_ptr="*i32", csc_ptr="*fp32", drp_ptr="*fp32", bsc_ptr="*fp32", bcode_ptr="*fp32",
        M=m, N=s, K=k, R=r, k_blocks_per_split=max(1, k // 4 // cfg.block_k if split_k else k // cfg.block_k),
        # forward: x (M,K) row-major; b = Wᵀ (strides 1, K); s = Aᵀ (strides 1, K); v = Bᵀ (strides 1, r)
        # dx: dy; b = W (strides K, 1); s = B (strides r, 1); v = A (strides K, 1)
        stride_am=1 if a_t else s, stride_ak=s if a_t else 1,  # (dW through TMA: A = dyᵀ, dy row-major)
        stride_bk=stride_bk, stride_bn=stride_bn,
        stride_bias=1, stride_um=r, stride_ur=1, stride_sk=1 if fwd else r, stride_sr=s if fwd else 1,
        stride_vr=1 if fwd else s, stride_vn=r if fwd else 1,
        stride_cm=s, stride_cn=1, stride_cs16=s * s // 16 if split_k else 0, stride_xam=r, stride_xar=1,
        stride_xas16=s * r // 16 if split_k else 0, stride_w=1 if row_scale else 0,
        stride_ids=1 if adapters or row_p else 0, stride_bsc=1 if int8_base else s // 64 if nf4_base else 0,
        stride_bsc2=1 if nf4_base else 0,
        lr_scale=1.0, sh_scale=1.0 if row_p else 1.0 / 0.9, p=0.1, seed=_seed(dropout, seed_value),
        HAS_BIAS=fwd and bias, LOW_RANK=low_rank, LR_DROPOUT=dropout and not fwd, SHRINK_DROPOUT=dropout and fwd,
        ROW_SCALE=row_scale, ADAPTERS=adapters, ROW_P=row_p and dropout,
        B_SCALE=(1 if fwd else 2) if int8_base else (3 if fwd else 4) if nf4_base else 0, B_GROUP=64 if nf4_base else 0,
        OFFSET_INT64=offset_int64, UPCAST=False, INPUT_PRECISION=precision, EVEN_K=even_k and k % cfg.block_k == 0,
        EVEN_R=r % block_r == 0 and low_rank != 2, ONE_R_TILE=r <= block_r,
        TMA=tma, TMA_DEVICE=tma and tma_device,
        A_T=a_t, B_T=b_t, PERSISTENT=persistent, WARP_SPECIALIZE=warp_specialize,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r, GROUP_M=cfg.group_m,
    )


#: The row factors of a rank product (:class:`Job`), each compiled on its own.
ROW_FACTORS = (dict(row_scale=True), dict(adapters=True))
#: Several adapters, each of its own dropout probability: on a pass that draws
#: a mask, each row's read by its adapter's id (the in-loop shrink and the
#: skinny SHRINK with the adapters' columns; dx's precomputed term and the dA
#: pass by the ids alone).
ROW_P = dict(adapters=True, row_p=True)
ROW_P_IDS_ONLY = dict(row_p=True)


def _seed(dropout: bool, seed_value: bool):
    """The kernel's seed argument: a pointer to an int32 where the pass draws
    a mask from a seed drawn on the device, else a value."""
    return "*i32" if dropout and not seed_value else 12345


#: The skinny kernel's passes, each with the outputs it computes: (SHRINK,
#: TN, COLSUM, DROPOUT). The dy pass computes g, dB and db, less those not
#: asked for ("-g": the dx GEMM computes g; "-dB", "-db": B or the bias
#: frozen, or no bias); "+no_dropout": the pass without a mask.
SKINNY_PASSES = {
    "forward_shrink": (True, False, False, True),
    "forward_shrink+no_dropout": (True, False, False, False),
    "dy_pass": (True, True, True, False),
    "dy_pass-db": (True, True, False, False),
    "dy_pass-g": (False, True, True, False),
    "dy_pass-g-db": (False, True, False, False),
    "dy_pass-dB": (True, False, True, False),
    "dy_pass-dB-db": (True, False, False, False),
    "dy_pass-g-dB": (False, False, True, False),
    "dA_pass": (False, True, False, True),
    "dA_pass+no_dropout": (False, True, False, False),
}


def _skinny_args(dtype: str, cfg, variant: str, block_r: int, even_c: bool = True, even_r: bool = True,
                 seed_value: bool = False, precision: str = "ieee", offset_int64: bool = False,
                 row_scale: bool = False, adapters: bool = False, row_p: bool = False, unit: str = "") -> dict:
    """Argument values of lora_skinny_kernel for one pass of :data:`SKINNY_PASSES`, as the launcher
    passes them (``+direct``: one row split, whose TN and COLSUM sums are stored as the outputs, in
    their dtype; ``unit="rank"``: r = 1. Its token count is never specialised: ``do_not_specialize``)."""
    if unit not in ("", "rank"):
        raise ValueError(f"the skinny kernel's only size compiled as a constant is its rank, not {unit!r}")
    s = SHAPE
    r = 1 if unit == "rank" else block_r if even_r else block_r // 2
    direct = variant.endswith("+direct")
    variant = variant.removesuffix("+direct")
    shrink, tn, colsum, dropout = SKINNY_PASSES[variant]
    dy_pass = variant.startswith("dy_pass")
    out = f"*{dtype}" if direct else "*fp32"
    return dict(
        t_ptr=f"*{dtype}", s_ptr=f"*{dtype}", l_ptr="*fp32", sh_ptr="*fp32", tn_ptr=out, cs_ptr=out, w_ptr="*fp32",
        ids_ptr="*i32", cid_ptr="*i32", csc_ptr="*fp32", drp_ptr="*fp32",
        M=s, C=s, R=r, m_start=0, m_end=s, rows_per_prog=cfg.block_m, c_tiles_per_prog=s // 2 // cfg.block_c,
        # S: forward Aᵀ (strides 1, K), dy pass B (strides r, 1)
        # TN: the dy pass writes dB (C, r) = (N, r), the dA pass dA (r, C) = (r, K), both as (p, C, r) views
        stride_tm=s, stride_tc=1, stride_sc=r if dy_pass else 1,
        stride_sr=1 if dy_pass else s, stride_lm=r, stride_lr=1,
        stride_shp=s * r, stride_shm=r, stride_shr=1,
        stride_tnp=s * r, stride_tnc=r if dy_pass else 1, stride_tnr=1 if dy_pass else s, stride_csp=s,
        stride_w=1 if row_scale else 0, stride_ids=1 if adapters or row_p else 0,
        sh_scale=1.0, tn_scale=1.0, p=0.1, seed=_seed(dropout, seed_value),
        SHRINK=shrink, TN=tn, COLSUM=colsum, ROW_SCALE=row_scale, ADAPTERS=adapters, DROPOUT=dropout,
        ROW_P=row_p and dropout,
        OFFSET_INT64=offset_int64, UPCAST=False, EVEN_C=even_c, EVEN_R=r % block_r == 0, INPUT_PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, BLOCK_R=block_r,
        SHRINK_STAGES=cfg.stages_for(4 if dtype == "fp32" else 2, block_r),
    )


def reduce_name(has_acc: bool, even: bool, second: bool, has_acc2: bool = False, out2: str = "fp32") -> str:
    """The report's name of one reduction kernel (``reduce_partials_kernel``'s
    meta-parameters): ``reduce``, or ``accumulate`` onto a running sum;
    ``+second``: a second reduction in the same launch (always masked), itself
    ``_accumulate`` and/or into an ``out2`` other than fp32 (``_bf16``...);
    ``+n_tail``: the first masked too (its size not a whole number of blocks)."""
    name = "accumulate" if has_acc else "reduce"
    if second:
        name += "+second" + ("_accumulate" if has_acc2 else "") + ("" if out2 == "fp32" else f"_{out2}")
    return name + ("" if even else "+n_tail")


_REDUCE_NAME = re.compile(r"(reduce|accumulate)(\+second(_accumulate)?(?:_(bf16|fp16))?)?(\+n_tail)?")


def _reduce_args(dtype: str, cfg, variant: str, block_r: int) -> dict:
    from fused_lora.kernels import configs

    acc, second, acc2, out2, tail = _REDUCE_NAME.fullmatch(variant).groups()
    even = tail is None
    return dict(part_ptr="*fp32", acc_ptr="*fp32", out_ptr=f"*{dtype}", P=64,
                numel=SHAPE * 16 if even else SHAPE * 15, stride_p=SHAPE * 16,
                part2_ptr="*fp32", acc2_ptr="*fp32", out2_ptr=f"*{out2 or 'fp32'}", P2=64,
                numel2=SHAPE * 16 if even else SHAPE * 15, stride_p2=SHAPE * 16,
                blocks=SHAPE * 16 // configs.REDUCE_BLOCK,
                HAS_ACC=acc == "accumulate", EVEN=even, HAS_ACC2=acc2 is not None, SECOND=second is not None,
                BLOCK=configs.REDUCE_BLOCK)


#: DoRA's norm: one rank tile (its B rows loaded once), or a rank of
#: several chunks (walked inside the K loop); several adapters' norms in one
#: read of W (``ADAPTERS``: three side by side, of a tile and a half each).
NORM_PASSES = ("norm", "norm_chunked", "norm_adapters")


def _norm_args(dtype: str, cfg, variant: str, block_r: int, even_k: bool = True, int8_base: bool = False,
               nf4_base: bool = False, unit: str = "") -> dict:
    """Argument values of dora_norm_kernel as the launcher passes them, for a
    contiguous (SHAPE, SHAPE) weight and a rank of one tile (``norm``) or of
    two and a half (``norm_chunked``); ``int8_base``: W int8 with its fp32
    row scales (QDoRA); ``nf4_base``: W NF4, (SHAPE, K/2) bytes, its fp32
    absmax in groups of 64 (the K tail: K = SHAPE - 64, a whole group);
    ``unit="rank"``: r = 1, on one rank tile."""
    if unit not in ("", "rank") or (unit and variant != "norm"):
        raise ValueError(f"the norm's only size compiled as a constant is its rank, on one tile: {unit!r}, {variant!r}")
    k = SHAPE if even_k else SHAPE - (64 if nf4_base else 8)
    r = 1 if unit else block_r if variant == "norm" else 2 * block_r + block_r // 2
    adapters = variant == "norm_adapters"
    if adapters:
        r = 3 * (block_r + block_r // 2)
    w_dtype = "*i8" if int8_base else "*u8" if nf4_base else f"*{dtype}"
    return dict(w_ptr=w_dtype, b_ptr=f"*{dtype}", a_ptr=f"*{dtype}", out_ptr="*fp32",
                s_ptr="*fp32", code_ptr="*fp32", N=SHAPE,
                K=k, R=r, stride_wn=k // 2 if nf4_base else k, stride_wk=1,
                stride_bn=r, stride_br=1, stride_ar=k, stride_ak=1,
                stride_s=1 if int8_base else k // 64 if nf4_base else 0, stride_s2=1 if nf4_base else 0, scaling=2.0,
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r, EVEN_K=even_k,
                ONE_R_TILE=variant == "norm", UPCAST=False, INPUT_PRECISION="ieee",
                W_SCALE=2 if nf4_base else int(int8_base), W_GROUP=64 if nf4_base else 0,
                bounds_ptr="*i32" if adapters else None, scales_ptr="*fp32" if adapters else None,
                n_adapters=3 if adapters else 1, ADAPTERS=4 if adapters else 0)


#: The NF4 absmax group the dequantisation kernel is compiled with, by pass:
#: 64 (QLoRA's, within the kernel's 128-column tile) and 256 (spanning it).
DEQUANT_GROUPS = {"dequantize": 64, "dequantize_wide_groups": 256}


def _dequant_args(dtype: str, cfg, even_k: bool = True, nf4: bool = False, group: int = 64) -> dict:
    """Argument values of dequantize_kernel as the launcher passes them, for
    a contiguous (SHAPE, SHAPE) Ŵ in ``dtype`` (the K tail: SHAPE - 8
    columns, SHAPE - ``group`` with NF4) from an int8 weight and its fp32
    row scales, or an NF4 one's bytes and fp32 absmax in groups of ``group``."""
    k = SHAPE if even_k else SHAPE - (group if nf4 else 8)
    return dict(q_ptr="*u8" if nf4 else "*i8", s_ptr="*fp32", code_ptr="*fp32", out_ptr=f"*{dtype}", N=SHAPE, K=k,
                stride_qn=k // 2 if nf4 else k, stride_qk=1, stride_sn=k // group if nf4 else 1,
                stride_sg=1 if nf4 else 0, stride_on=k, stride_ok=1, NF4=nf4, GROUP=group if nf4 else 0,
                EVEN_K=even_k, UPCAST=False, BLOCK_ROWS=cfg.block_rows, BLOCK_COLS=cfg.block_cols)


def _mask_args(cfg, even_k: bool = True, seed_value: bool = False, offset_int64: bool = False) -> dict:
    """Argument values of keep_mask_kernel as the launcher passes them, for
    a contiguous (SHAPE, SHAPE) mask (the K tail: SHAPE - 8 columns), its
    seed drawn on the device (read through a pointer) or a value."""
    k = SHAPE if even_k else SHAPE - 8
    return dict(out_ptr="*u8", M=SHAPE, K=k, stride_om=k, p=0.1, seed=_seed(True, seed_value),
                OFFSET_INT64=offset_int64, BLOCK_ROWS=cfg.block_rows, BLOCK_COLS=cfg.block_cols)


def _ast_source(fn, values: dict):
    """An ASTSource with the runtime's specialisation: pointers and ints that
    are multiples of 16 carry ``tt.divisibility=16``; ints equal to 1 and every
    meta-parameter (a ``tl.constexpr`` parameter) are constants;
    ``do_not_specialize`` ints are plain i32, as the runtime passes them."""
    from triton.compiler import ASTSource

    plain = {fn.arg_names[i] if isinstance(i, int) else i for i in getattr(fn, "do_not_specialize", ())}
    meta = {p.name for p in fn.params if p.is_constexpr}
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = values[name]
        if isinstance(value, str) and value.startswith("*"):
            signature[name] = value
            if name not in plain and i not in plain:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, str) and value.startswith("tensordesc"):
            signature[name] = value
        elif value is None:  # an unused optional argument: a None constant
            signature[name] = "constexpr"
            constants[name] = None
        elif name in meta:
            signature[name] = "constexpr"
            constants[name] = value
        elif isinstance(value, int) and (name in plain or i in plain):
            signature[name] = "i32"
        elif isinstance(value, int) and value == 1:
            signature[name] = "constexpr"
            constants[name] = value
        elif isinstance(value, int):
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}={value!r}")
    return ASTSource(fn, signature, constants, attrs)


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill (?:stores|loads)")


def ptxas_stats(log: str) -> tuple[int, int]:
    """(registers, spill store + load bytes) from the ``ptxas -v`` log of one
    kernel."""
    used = _PTXAS_USED.findall(log)
    if len(used) != 1:
        raise ValueError(f"expected one kernel's register count in the ptxas log, found {len(used)}: {log[-500:]!r}")
    return int(used[0]), sum(int(n) for n in _PTXAS_SPILLS.findall(log))


def _compile(src, arch: int, options: dict):
    """``triton.compile`` for ``arch``, always compiling (no cache hit), and the
    log of the ``ptxas -v`` that Triton itself runs to assemble the kernel: its
    own ptxas (Triton 3.6 bundles CUDA 12.8's for sm_90, 3.9 its newest) with
    its own flags (3.9 adds ``--regAllocOptLevel=2``), so the registers and
    spills are those of the kernel the runtime loads."""
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    out = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(out):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True  # (make_cubin prints the log)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled, out.getvalue()


def result_of(job: Job) -> Result:
    """The (empty) result of ``job``, named as the report names it: its pass
    and each variant (``+k_tail``, ``+tma``...)."""
    tail = "+k_tail" if job.kernel in ("gemm", "norm", "mask", "dequant") else "+c_tail"
    return Result(job.kernel, job.pass_name + ("" if job.even_k else tail) + ("" if job.even_r else "+r_tail")
                  + ("+split_k" if job.split_k else "") + ("+tma" if job.tma else "")
                  + ("+persistent" if job.persistent else "") + ("+seed_value" if job.seed_value else "")
                  + ("+tf32" if job.tf32 else "") + ("" if job.bias else "+no_bias")
                  + ("+offset_int64" if job.offset_int64 else "") + ("+row_scale" if job.row_scale else "")
                  + ("+adapters" if job.adapters else "") + ("+row_p" if job.row_p else "")
                  + ("+int8_base" if job.int8_base else "")
                  + ("+nf4_base" if job.nf4_base else "") + ("+tma_device" if job.tma_device else "")
                  + ("+rank_loop" if job.rank_loop else "") + UNITS.get(job.unit, "")
                  + ("+warp_specialized" if job.warp_specialize else ""),
                  job.dtype, job.arch, job.config, job.block_r)


def kernel_args(job: Job):
    """``(kernel, argument values)`` of ``job``: the kernel it compiles and
    the values its launcher passes (:func:`_ast_source` specialises them)."""
    from fused_lora.kernels import configs, dequant, dora, gemm, mask, skinny

    precision = "tf32" if job.tf32 else "ieee"
    if job.kernel == "gemm":
        cfg = configs.GemmConfig(**job.config)
        return gemm.lora_gemm_kernel, _gemm_args(job.dtype, cfg, job.pass_name, job.block_r, job.even_k,
                                                 job.split_k, job.tma, job.even_r, job.persistent,
                                                 job.seed_value, precision, job.bias, job.offset_int64,
                                                 job.row_scale, job.adapters, job.int8_base,
                                                 job.nf4_base, job.row_p, job.tma_device, job.rank_loop,
                                                 job.unit, job.warp_specialize)
    if job.kernel == "skinny":
        cfg = configs.SkinnyConfig(**job.config)
        return skinny.lora_skinny_kernel, _skinny_args(job.dtype, cfg, job.pass_name, job.block_r, job.even_k,
                                                       job.even_r, job.seed_value, precision, job.offset_int64,
                                                       job.row_scale, job.adapters, job.row_p, job.unit)
    if job.kernel == "norm":
        cfg = configs.NormConfig(**job.config)
        return dora.dora_norm_kernel, _norm_args(job.dtype, cfg, job.pass_name, job.block_r, job.even_k,
                                                 job.int8_base, job.nf4_base, job.unit)
    if job.kernel == "dequant":
        return dequant.dequantize_kernel, _dequant_args(job.dtype, configs.TileConfig(**job.config), job.even_k,
                                                        job.nf4_base, DEQUANT_GROUPS[job.pass_name])
    if job.kernel == "mask":
        return mask.keep_mask_kernel, _mask_args(configs.TileConfig(**job.config), job.even_k, job.seed_value,
                                                 job.offset_int64)
    return skinny.reduce_partials_kernel, _reduce_args(job.dtype, None, job.pass_name, job.block_r)


def compile_job(job: Job, maxnreg: int | None = None) -> Result:
    """``job`` compiled, with ``maxnreg`` (a ceiling on registers a thread,
    PTX's ``.maxnreg``; the runtime sets none) if given."""
    from fused_lora.kernels import configs

    res = result_of(job)
    try:
        fn, values = kernel_args(job)
        options = {"num_warps": job.config.get("num_warps", 4), "num_stages": job.config.get("num_stages", 2),
                   "enable_fp_fusion": configs.FP_FUSION}
        if maxnreg is not None:
            options["maxnreg"] = maxnreg
        src = _ast_source(fn, values)
        compiled, ptxas_log = _compile(src, job.arch, options)
        ptx = compiled.asm["ptx"]
        res.shared = int(compiled.metadata.shared)
        res.wgmma = "wgmma" in ptx
        res.mma_sync = "mma.sync" in ptx
        res.tma = "cp.async.bulk.tensor" in ptx
        res.warp_specialized = "setmaxnreg" in ptx
        if job.kernel == "skinny" and values.get("seed") == "*i32":
            # (the seed's one 4-byte load is not a load of the wide operand, which the widths are about)
            params = [name for name, kind in src.signature.items() if kind != "constexpr"]  # (the PTX's, in order)
            ptx_loads = without_seed_load(ptx, params.index("seed"))
        else:
            ptx_loads = ptx
        res.load_widths = load_widths(ptx_loads)
        res.registers, res.spill_bytes = ptxas_stats(ptxas_log)
    except Exception as err:  # reported, not raised: the report lists every failure
        res.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return res


_LD_GLOBAL = re.compile(r"\bld\.global[\w.]*?(?:\.v(\d))?\.[bufs](\d+)\s")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


def without_seed_load(ptx: str, param: int) -> str:
    """``ptx`` less the load of the dropout seed through its pointer (the
    kernel's parameter number ``param``): one 4-byte scalar by design."""
    regs = re.findall(rf"ld\.param\.[bu]64\s+(%rd\d+),\s*\[\w+_param_{param}\];", ptx)
    if len(regs) != 1:
        raise ValueError(f"the seed pointer (parameter {param}) is not loaded once in the PTX: {regs}")
    load = re.compile(rf"\bld\.global\.[bu]32\s+\{{?\s*%r\d+\s*\}}?,\s*\[\s*{re.escape(regs[0])}(\s*\+\s*0)?\s*\];")
    lines = ptx.splitlines()
    kept = [line for line in lines if not load.search(line)]
    if len(kept) != len(lines) - 1:
        raise ValueError(f"expected one 4-byte load of the seed through {regs[0]}, found {len(lines) - len(kept)}")
    return "\n".join(kept)


def load_widths(ptx: str) -> list[int]:
    """The distinct widths in bytes of the global loads in ``ptx``, ascending:
    ``ld.global[.vN].bB`` (N·B/8) and ``cp.async`` into shared memory (its
    copy size)."""
    widths = {int(v or 1) * int(b) // 8 for v, b in _LD_GLOBAL.findall(ptx)}
    widths |= {int(n, 0) for n in _CP_ASYNC.findall(ptx)}
    return sorted(widths)


def _gemm_pruning(pass_name: str) -> dict:
    """How a GEMM pass's dropout mask prunes its tiles (``configs.gemm_candidates``):
    dx's masks its low-rank term (``epilogue_mask``), the in-loop forward's the
    shrink's input (``shrink_mask``)."""
    dropout = pass_name.endswith("_dropout")
    forward = pass_name.startswith("forward")
    return dict(epilogue_mask=dropout and not forward, shrink_mask=dropout and forward)


#: fp16's GEMMs are bf16's with the other 16-bit type. Over every pair the
#: report compiled (Triton 3.6 and 3.9, sm_90, every fp16 tile: 732 pairs),
#: the shared memory, wgmma, TMA copies, load widths and whether it spills
#: were the same; fp16's registers were at most 2 above bf16's with pointers
#: on one program a tile (on 3.6 257 of 268 the same), and on the TMA and
#: persistent variants at most 6 above on 3.9 and 11 on 3.6 (the persistent
#: masked in-loop forward, 64x128, 215 and 226). So fp16's GEMMs are
#: compiled on the largest tile of each pass, variant and rank tile (every
#: kernel specialisation once), and on every tile where the bf16 twin comes
#: within this many registers of the limit, spills or fails
#: (:func:`fp16_twins`); ``every_fp16_tile`` (``--every-fp16-tile``)
#: compiles them all. (The skinny passes and the reductions, one tile each,
#: are compiled in fp16 at every rank tile and variant; for the other
#: archs, where this was not measured, fp16's GEMMs on every tile.)
FP16_TWIN_REGISTER_MARGIN = 24

#: How much the report compiles (``--scope``; :func:`jobs_for`):
#:
#: * ``tiles`` (the default): every kernel on every tile the dispatch may run
#:   it with (the tile it picks depends on M, N and the GPU's SM count, so
#:   for some layer any tile that fits is picked), as above;
#: * ``kernels``: every kernel specialisation once (each pass, rank tile,
#:   variant and dtype, with pointers, TMA, the persistent grid, TF32), on
#:   the tile the dispatch runs it with at large M (its pass's first
#:   candidate; split-K's partials on the tile that splits at small M);
#: * ``paths``: every code path once: ``kernels`` at one rank tile of each,
#:   the largest it runs with (its most registers as a rule, not always: on
#:   3.9 a smaller rank tile took up to 66 more). The rank tile, like the
#:   tile, is a size: no code branches on it. On sm_90 fp16's GEMMs and
#:   skinny passes, the same code as bf16's with the other 16-bit type, only
#:   where :func:`fp16_twins` adds them (bf16's near the register limit,
#:   above; the skinny passes' pairs in the ``paths`` reports of 3.6 and 3.9,
#:   57 each, differed in registers alone, fp16's at most 6 above).
#:
#: The test suite compiles ``paths`` with the GPU machine's Triton and with
#: the newest (``tests/lora_testing.py``: on CI's two cores the two
#: ``tiles`` reports took 31 of its 43 minutes; the two ``paths`` reports,
#: with every fp16 kernel, about 1,700 of the 3,600 CPU-seconds of a
#: 30-minute run); ``make compile-report`` compiles ``tiles`` with both.
SCOPES = ("tiles", "kernels", "paths")


def jobs_for(arch: int, every_fp16_tile: bool = False, every_variant: bool = False,
             scope: str = "tiles") -> list[Job]:
    """Every shipped configuration, with each pass (and rank tile) it serves
    (fp16's GEMMs: :data:`FP16_TWIN_REGISTER_MARGIN`); with
    ``every_variant``, :func:`with_every_variant` of those; ``scope``: how
    many tiles and rank tiles (:data:`SCOPES`)."""
    from fused_lora.kernels import configs  # (configs only: no kernel is decorated here)

    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if every_fp16_tile and scope != "tiles":
        raise ValueError(f"every_fp16_tile compiles fp16's GEMMs on every tile: it needs scope='tiles', "
                         f"got {scope!r}")
    jobs = []
    shipped = configs.shipped_configs()
    smem = configs.smem_limit_for(arch)  # (below Hopper's, tiles that do not fit run with fewer stages)
    for dtype in ("bf16", "fp16", "fp32"):
        elt = 4 if dtype == "fp32" else 2
        # (fp16's GEMMs for sm_90, where the twins were measured: the largest tile, and bf16's twins)
        every_tile = scope == "tiles" and (dtype != "fp16" or every_fp16_tile or arch != 90)
        # (pass, rank tile, in-loop shrink, dropout mask), at every rank tile the pass runs with (each
        # is its own kernel): the in-loop passes (the forward, and dx at small M) hold the whole rank in
        # one tile; the others add the precomputed low-rank term in chunks of at most GEMM_LR_MAX_BLOCK_R.
        # (The forward's mask is on its in-loop shrink's input, dx's on its low-rank term: _gemm_pruning.)
        passes = [(pass_name, block_r, True, mask) for pass_name, mask in (
                      ("forward_in_loop", False), ("forward_in_loop_dropout", True), ("dx_in_loop", False),
                      ("dx_in_loop_dropout", True))
                  for block_r in configs.rank_tiles(configs.in_loop_max_block_r(elt))]
        passes += [(pass_name, block_r, False, mask) for pass_name, mask in (
                       ("forward_split", False), ("dx", False), ("dx_dropout", True))
                   for block_r in configs.rank_tiles(configs.GEMM_LR_MAX_BLOCK_R[elt])]
        passes += [("dw", configs.block_r_for(1), False, False)]  # (no low-rank term: the smallest tile)
        for pass_name, block_r, in_loop, mask in passes:
            fitting = configs.gemm_candidates(elt, block_r, in_loop, arch=arch, smem_limit=smem,
                                              **_gemm_pruning(pass_name))
            for cfg in fitting if every_tile else fitting[:1]:  # (a tile pruned: one never launched for it)
                for tf32 in (False, True) if elt == 4 else (False,):
                    jobs.append(Job("gemm", pass_name, dtype, asdict(cfg), arch, block_r, tf32=tf32))
            # the masked K tail (K not a multiple of BLOCK_K), and a rank below its tile
            # (r = 8 in a 16 tile), on the largest tile of each pass
            jobs.append(Job("gemm", pass_name, dtype, asdict(fitting[0]), arch, block_r, even_k=False))
            jobs.append(Job("gemm", pass_name, dtype, asdict(fitting[0]), arch, block_r, even_r=False))
            if not in_loop and pass_name != "dw" and block_r == configs.GEMM_LR_MAX_BLOCK_R[elt]:
                # a rank over the largest tile: the precomputed term walked in rank tiles (r = 2 and 1.5
                # tiles), on the largest tile that holds that loop's shared memory
                looping = configs.gemm_candidates(elt, block_r, in_loop, arch=arch, smem_limit=smem, rank_loop=True,
                                                  **_gemm_pruning(pass_name))
                for cfg in looping if every_tile else looping[:1]:
                    for even_r in (True, False) if cfg is looping[0] else (True,):
                        jobs.append(Job("gemm", pass_name, dtype, asdict(cfg), arch, block_r, even_r=even_r,
                                        rank_loop=True))
                    if elt == 2 and arch >= 90:  # (and through TMA, where the GEMMs read their tiles so)
                        jobs.append(Job("gemm", pass_name, dtype, asdict(cfg), arch, block_r, tma=True,
                                        rank_loop=True))
                if mask:  # (its mask drawn after that loop: several adapters' dropout probabilities)
                    jobs.append(Job("gemm", pass_name, dtype, asdict(looping[0]), arch, block_r, rank_loop=True,
                                    **ROW_P_IDS_ONLY))
            if pass_name.startswith("forward"):  # a layer without a bias
                jobs.append(Job("gemm", pass_name, dtype, asdict(fitting[0]), arch, block_r, bias=False))
            if mask:  # an explicit seed: passed as a value; a mask over 2**31 elements or more
                jobs.append(Job("gemm", pass_name, dtype, asdict(fitting[0]), arch, block_r, seed_value=True))
                jobs.append(Job("gemm", pass_name, dtype, asdict(fitting[0]), arch, block_r, offset_int64=True))
            if in_loop:  # each row factor on the in-loop shrink (a mixed batch; several adapters)
                for factor in ROW_FACTORS:
                    jobs.append(Job("gemm", pass_name, dtype, asdict(fitting[0]), arch, block_r, **factor))
            if mask:  # several adapters' dropout probabilities (the in-loop passes with their columns)
                jobs.append(Job("gemm", pass_name, dtype, asdict(fitting[0]), arch, block_r,
                                **(ROW_P if in_loop else ROW_P_IDS_ONLY)))
            if pass_name != "dw":  # an int8 base (its own tiles: configs.int8_b_fits), and its K tail
                int8_tiles = _quantized_tiles(elt, block_r, in_loop, arch, smem, pass_name)
                for cfg in int8_tiles if every_tile else int8_tiles[:1]:
                    jobs.append(Job("gemm", pass_name, dtype, asdict(cfg), arch, block_r, int8_base=True))
                jobs.append(Job("gemm", pass_name, dtype, asdict(int8_tiles[0]), arch, block_r, even_k=False,
                                int8_base=True))
                if not in_loop and block_r == configs.block_r_for(1):  # a rank below its tile (QLoRA's r = 8)
                    jobs.append(Job("gemm", pass_name, dtype, asdict(int8_tiles[0]), arch, block_r, even_r=False,
                                    int8_base=True))
            if pass_name != "dw" and not in_loop:  # an NF4 base (its own tiles: configs.nf4_b_fits), its K tail
                nf4_tiles = _quantized_tiles(elt, block_r, in_loop, arch, smem, pass_name, nf4=True)
                for cfg in nf4_tiles if every_tile else nf4_tiles[:1]:
                    jobs.append(Job("gemm", pass_name, dtype, asdict(cfg), arch, block_r, nf4_base=True))
                jobs.append(Job("gemm", pass_name, dtype, asdict(nf4_tiles[0]), arch, block_r, even_k=False,
                                nf4_base=True))
                if block_r == configs.block_r_for(1):  # a rank below its tile (in-loop passes mask theirs always)
                    jobs.append(Job("gemm", pass_name, dtype, asdict(nf4_tiles[0]), arch, block_r, even_r=False,
                                    nf4_base=True))
                if block_r == configs.GEMM_LR_MAX_BLOCK_R[elt]:  # a rank over the largest tile (QLoRA at r = 128)
                    nf4_looping = configs.gemm_candidates(elt, block_r, in_loop, arch=arch, smem_limit=smem,
                                                          nf4_b=True, rank_loop=True, **_gemm_pruning(pass_name))
                    for cfg in nf4_looping if every_tile else nf4_looping[:1]:
                        jobs.append(Job("gemm", pass_name, dtype, asdict(cfg), arch, block_r, even_r=False,
                                        nf4_base=True, rank_loop=True))
        # Split-K partials (fp32 stores into the workspace), on the tiles the
        # heuristic picks where it splits: every pass at small M; dW (whose K is
        # the tokens) where its output is small: a 256x256 layer over 64 K tokens.
        for pass_name, block_r, in_loop, mask in passes:
            m, n, k = (256, 256, 65536) if pass_name == "dw" else (16, SHAPE, SHAPE)
            cfg = configs.gemm_config(m, n, k, block_r, elt, in_loop, False, arch=arch, smem_limit=smem,
                                      **_gemm_pruning(pass_name))
            assert cfg.split_k > 1, (pass_name, cfg)
            cfg = dataclasses.replace(cfg, split_k=1)  # (the kernel's code does not depend on the count)
            for tma, tf32 in ([(False, False), (True, False)] if elt == 2 and arch >= 90
                              else [(False, False), (False, True)] if elt == 4 else [(False, False)]):
                jobs.append(Job("gemm", pass_name, dtype, asdict(cfg), arch, block_r, split_k=True, tma=tma,
                                tf32=tf32))
            if in_loop:  # (the mixed batches of decoding: small M, a row factor)
                for factor in ROW_FACTORS + ((ROW_P,) if mask else ()):
                    jobs.append(Job("gemm", pass_name, dtype, asdict(cfg), arch, block_r, split_k=True, **factor))
            if pass_name != "dw":  # (decoding on an int8 base)
                cfg8 = configs.gemm_config(m, n, k, block_r, elt, in_loop, False, arch=arch, smem_limit=smem,
                                           int8_b=True, **_gemm_pruning(pass_name))
                assert cfg8.split_k > 1, (pass_name, cfg8)
                jobs.append(Job("gemm", pass_name, dtype, asdict(dataclasses.replace(cfg8, split_k=1)), arch, block_r,
                                split_k=True, int8_base=True))
            if pass_name != "dw" and not in_loop:  # (decoding on an NF4 base)
                cfg4 = configs.gemm_config(m, n, k, block_r, elt, in_loop, False, arch=arch, smem_limit=smem,
                                           nf4_b=True, **_gemm_pruning(pass_name))
                assert cfg4.split_k > 1, (pass_name, cfg4)
                jobs.append(Job("gemm", pass_name, dtype, asdict(dataclasses.replace(cfg4, split_k=1)), arch, block_r,
                                split_k=True, nf4_base=True))
        # Sizes of 1, which the runtime compiles as constants: one token (decoding), on the tile and
        # split-K the dispatch picks there (and each row factor on the in-loop shrink: several adapters
        # serving one token), dW's K over one token on its largest tile; r = 1, on the largest tile
        for pass_name, block_r, in_loop, mask in passes:
            if pass_name == "dw":
                cfg = configs.gemm_candidates(elt, block_r, in_loop, arch=arch, smem_limit=smem)[0]
            else:
                cfg = configs.gemm_config(1, SHAPE, SHAPE, block_r, elt, in_loop, False, arch=arch,
                                          smem_limit=smem, **_gemm_pruning(pass_name))
            one = dataclasses.replace(cfg, split_k=1)
            for factor in ({},) + (ROW_FACTORS if in_loop else ()):
                jobs.append(Job("gemm", pass_name, dtype, asdict(one), arch, block_r, split_k=cfg.split_k > 1,
                                unit="tokens", **factor))
            if pass_name != "dw" and block_r == configs.block_r_for(1):
                fitting = configs.gemm_candidates(elt, block_r, in_loop, arch=arch, smem_limit=smem,
                                                  **_gemm_pruning(pass_name))
                jobs.append(Job("gemm", pass_name, dtype, asdict(fitting[0]), arch, block_r, unit="rank"))
        # TMA (16-bit, Hopper): every pass on every shipped tile it may run on, with a K tail
        # on the largest tile of each pass; the persistent grid likewise.
        if elt == 2 and arch >= 90:
            for pass_name, block_r, in_loop, mask in passes:
                fitting = configs.gemm_candidates(elt, block_r, in_loop, arch=arch, smem_limit=smem,
                                                  **_gemm_pruning(pass_name))
                for cfg in fitting if every_tile else fitting[:1]:
                    jobs.append(Job("gemm", pass_name, dtype, asdict(cfg), arch, block_r, tma=True))
                    if cfg is fitting[0]:
                        jobs.append(Job("gemm", pass_name, dtype, asdict(cfg), arch, block_r, even_k=False, tma=True))
                        # the descriptors made by the kernel (set_tma_descriptors("device")), with a K tail
                        jobs.append(Job("gemm", pass_name, dtype, asdict(cfg), arch, block_r, even_k=False, tma=True,
                                        tma_device=True))
                # the persistent grid (16-bit, Hopper's shared memory; its own, narrower tiles), with
                # pointers and with TMA
                persistent = configs.gemm_candidates(elt, block_r, in_loop, arch=arch, persistent=True,
                                                     smem_limit=smem, **_gemm_pruning(pass_name)) \
                    if configs.persistent_grid_fits(smem) else []
                for cfg in persistent if every_tile else persistent[:1]:
                    for tma in (False, True):
                        jobs.append(Job("gemm", pass_name, dtype, asdict(cfg), arch, block_r, tma=tma,
                                        persistent=True))
                    if cfg is persistent[0]:  # (made once a program, before its tile loop)
                        jobs.append(Job("gemm", pass_name, dtype, asdict(cfg), arch, block_r, tma=True,
                                        persistent=True, tma_device=True))
                if persistent and in_loop:  # each row factor on the largest persistent tile, with TMA
                    for factor in ROW_FACTORS:
                        jobs.append(Job("gemm", pass_name, dtype, asdict(persistent[0]), arch, block_r, tma=True,
                                        persistent=True, **factor))
                if pass_name != "dw":  # an int8 base's tiles through TMA, and on the persistent grid
                    jobs.append(Job("gemm", pass_name, dtype, asdict(_quantized_tiles(elt, block_r, in_loop, arch, smem,
                                                                               pass_name)[0]),
                                    arch, block_r, tma=True, int8_base=True))
                    persistent8 = _quantized_tiles(elt, block_r, in_loop, arch, smem, pass_name, persistent=True) \
                        if persistent else []
                    if persistent8:
                        jobs.append(Job("gemm", pass_name, dtype, asdict(persistent8[0]), arch, block_r, tma=True,
                                        persistent=True, int8_base=True))
        # hybrid's launches (an empty K loop: the low-rank term alone, cuBLAS adds the base in place) on
        # their own tile: each pass with a precomputed term at every rank tile, a rank below its tile and a
        # rank over the largest (its loop), a forward without a bias, dx's mask with a seed value, 64-bit
        # counters and several adapters' probabilities, one token and a rank of 1 (never split along K,
        # never through TMA, on the persistent grid or over a quantized base: the plan's hybrid). With
        # the narrower scopes, only the kernels not compiled above on another tile (one token unsplit).
        low_rank_only = asdict(configs.LOW_RANK_ONLY_GEMM[elt])
        first_hybrid = len(jobs)
        for pass_name, block_r, in_loop, mask in passes:
            if in_loop or pass_name == "dw":
                continue
            for tf32 in (False, True) if elt == 4 else (False,):
                jobs.append(Job("gemm", pass_name, dtype, low_rank_only, arch, block_r, tf32=tf32))
            jobs.append(Job("gemm", pass_name, dtype, low_rank_only, arch, block_r, even_r=False))
            if block_r == configs.GEMM_LR_MAX_BLOCK_R[elt]:
                for even_r in (True, False):
                    jobs.append(Job("gemm", pass_name, dtype, low_rank_only, arch, block_r, even_r=even_r,
                                    rank_loop=True))
                if mask:
                    jobs.append(Job("gemm", pass_name, dtype, low_rank_only, arch, block_r, rank_loop=True,
                                    **ROW_P_IDS_ONLY))
            if pass_name.startswith("forward"):
                jobs.append(Job("gemm", pass_name, dtype, low_rank_only, arch, block_r, bias=False))
            if mask:
                jobs.append(Job("gemm", pass_name, dtype, low_rank_only, arch, block_r, seed_value=True))
                jobs.append(Job("gemm", pass_name, dtype, low_rank_only, arch, block_r, offset_int64=True))
                jobs.append(Job("gemm", pass_name, dtype, low_rank_only, arch, block_r, **ROW_P_IDS_ONLY))
            jobs.append(Job("gemm", pass_name, dtype, low_rank_only, arch, block_r, unit="tokens"))
            if block_r == configs.block_r_for(1):
                jobs.append(Job("gemm", pass_name, dtype, low_rank_only, arch, block_r, unit="rank"))
        if scope != "tiles":
            compiled = {_job_id(dataclasses.replace(j, config={})) for j in jobs[:first_hybrid]}
            jobs[first_hybrid:] = [j for j in jobs[first_hybrid:]
                                   if _job_id(dataclasses.replace(j, config={})) not in compiled]
        for cfg in shipped["skinny_fp32" if elt == 4 else "skinny_16bit"]:
            # (as the dispatch runs it on this arch: SHRINK's stages fitted to its shared memory at each rank tile)
            tiles = asdict(dataclasses.replace(cfg, smem_limit=configs.smem_limit_for(arch)))
            top = cfg.max_block_r
            for pass_name, (shrink, tn, colsum, dropout) in SKINNY_PASSES.items():
                for block_r in configs.rank_tiles(top):
                    for tf32 in (False, True) if elt == 4 else (False,):
                        jobs.append(Job("skinny", pass_name, dtype, tiles, arch, block_r, tf32=tf32))
                # the masked column tail (C not a multiple of BLOCK_C), a rank below its tile
                jobs.append(Job("skinny", pass_name, dtype, tiles, arch, 16, even_k=False))
                jobs.append(Job("skinny", pass_name, dtype, tiles, arch, top, even_r=False))
                jobs.append(Job("skinny", pass_name, dtype, tiles, arch, 16, unit="rank"))  # (r = 1: a constant)
                if (tn or colsum) and dtype != "fp32":  # (fp32: the same stores as the partials')
                    jobs.append(Job("skinny", pass_name + "+direct", dtype, tiles, arch, 16))
                if dropout:  # an explicit seed: passed as a value; a mask over 2**31 elements or more
                    jobs.append(Job("skinny", pass_name, dtype, tiles, arch, top, seed_value=True))
                    jobs.append(Job("skinny", pass_name, dtype, tiles, arch, top, offset_int64=True))
                if shrink:  # each row factor on the SHRINK product (xa, g)
                    for factor in ROW_FACTORS:
                        jobs.append(Job("skinny", pass_name, dtype, tiles, arch, top, **factor))
                if dropout:  # several adapters' dropout probabilities (the forward's with their columns)
                    jobs.append(Job("skinny", pass_name, dtype, tiles, arch, top,
                                    **(ROW_P if shrink else ROW_P_IDS_ONLY)))
        # DoRA's norm: every rank tile, a K tail, a rank of several chunks
        for cfg in shipped["norm_fp32" if elt == 4 else "norm_16bit"]:
            for block_r in configs.rank_tiles(cfg.max_block_r):
                jobs.append(Job("norm", "norm", dtype, asdict(cfg), arch, block_r))
            jobs.append(Job("norm", "norm", dtype, asdict(cfg), arch, 16, even_k=False))
            jobs.append(Job("norm", "norm", dtype, asdict(cfg), arch, 16, unit="rank"))  # (r = 1: a constant)
            jobs.append(Job("norm", "norm_chunked", dtype, asdict(cfg), arch, cfg.max_block_r))
            # several DoRA adapters' norms in one read of W (multi_lora_linear's magnitude), with a K tail
            for even_k in (True, False):
                jobs.append(Job("norm", "norm_adapters", dtype, asdict(cfg), arch, cfg.max_block_r, even_k=even_k))
        # an int8 W (QDoRA) or an NF4 one (QDoRA on QLoRA's base), its rows dequantised as loaded, on
        # their own tile: one rank tile, a K tail, the chunked rank, several adapters
        for cfg in shipped["norm_quantized_fp32" if elt == 4 else "norm_quantized_16bit"]:
            for base in ("int8_base", "nf4_base"):
                for even_k, pass_name in ((True, "norm"), (False, "norm"), (True, "norm_chunked"),
                                          (True, "norm_adapters")):
                    jobs.append(Job("norm", pass_name, dtype, asdict(cfg), arch, cfg.max_block_r, even_k=even_k,
                                    **{base: True}))
        # the reductions: every combination of the kernel's meta-parameters, a second output in fp32
        # or in the operands' dtype (the first being either)
        seconds = ("fp32", dtype) if elt == 2 else ("fp32", "bf16", "fp16")
        for has_acc, even, second in itertools.product((False, True), repeat=3):
            for has_acc2, out2 in itertools.product((False, True), seconds) if second else [(False, "fp32")]:
                jobs.append(Job("reduce", reduce_name(has_acc, even, second, has_acc2, out2), dtype,
                                dict(configs.REDUCE_LAUNCH), arch))
        # the dequantisation kernel into this dtype: an int8 base, an NF4 one in groups of 64 (within a
        # tile) and of 256 (a group spanning the tile), each with a K tail
        for cfg in shipped["dequant"]:
            for pass_name, base in (("dequantize", "int8_base"), ("dequantize", "nf4_base"),
                                    ("dequantize_wide_groups", "nf4_base")):
                for even_k in (True, False):
                    jobs.append(Job("dequant", pass_name, dtype, asdict(cfg), arch, even_k=even_k, **{base: True}))
    # the keep-mask pass (one kernel whatever x's dtype): its seed drawn on the device, a K tail, an explicit
    # seed, a mask of 2**31 elements or more
    for cfg in shipped["mask"]:
        for variant in ({}, dict(even_k=False), dict(seed_value=True), dict(offset_int64=True)):
            jobs.append(Job("mask", "keep_mask", "u8", asdict(cfg), arch, **variant))
    jobs = with_every_variant(jobs) if every_variant else jobs
    if scope != "paths":
        return jobs
    # (on sm_90 fp16's GEMMs and skinny passes are bf16's twins, compiled where those come near the limit:
    # fp16_twins)
    return largest_rank_tiles([j for j in jobs if not (j.kernel != "reduce" and j.dtype == "fp16" and arch == 90)])


def _quantized_tiles(elt: int, block_r: int, in_loop: bool, arch: int, smem: int, pass_name: str,
                persistent: bool = False, nf4: bool = False) -> list:
    """The tiles a GEMM pass runs an int8 base on (``configs.gemm_candidates``' ``int8_b``), or, ``nf4``, an
    NF4 one (``nf4_b``)."""
    from fused_lora.kernels import configs

    return configs.gemm_candidates(elt, block_r, in_loop, arch=arch, smem_limit=smem, persistent=persistent,
                                   int8_b=not nf4, nf4_b=nf4, **_gemm_pruning(pass_name))


def warp_specialized_jobs(arch: int = 90) -> list[Job]:
    """The warp-specialised GEMMs ``bench/gpu_probe.py`` launches (no plan
    runs them): the forward and dx with their precomputed term, 16-bit, on
    :data:`fused_lora.kernels.configs.WARP_SPECIALIZED_GEMM`, through TMA with
    the descriptors the kernel makes, at the probe's rank tile of 16 (the
    forward with its bias) (``--warp-specialized``)."""
    from fused_lora.kernels import configs

    config = dataclasses.asdict(configs.WARP_SPECIALIZED_GEMM)
    return [Job("gemm", pass_name, dtype, config, arch, tma=True, tma_device=True, warp_specialize=True)
            for dtype in ("bf16", "fp16") for pass_name in ("forward_split", "dx")]


def warp_specialization_problems(results: list[Result]) -> list[str]:
    """What ``--warp-specialized`` fails on: a kernel that did not compile, or
    that Triton's pass left as it was (its spills are reported, not failed:
    no plan runs these kernels)."""
    return [f"{r.pass_name} {r.dtype}: {r.error}" if r.error else
            f"{r.pass_name} {r.dtype}: Triton's pass left the K loop as it was (no setmaxnreg in the PTX)"
            for r in results if r.error or not r.warp_specialized]


def largest_rank_tiles(jobs: list[Job]) -> list[Job]:
    """``jobs`` less those whose kernel (pass, variant, dtype, loads, grid)
    is among them at a larger rank tile."""
    def kernel(job: Job) -> str:
        return _job_id(dataclasses.replace(job, block_r=0, config={}))

    keys = [kernel(job) for job in jobs]
    largest: dict[str, int] = {}
    for key, job in zip(keys, jobs):
        largest[key] = max(largest.get(key, 0), job.block_r)
    return [job for key, job in zip(keys, jobs) if job.block_r == largest[key]]


def with_every_variant(jobs: list[Job]) -> list[Job]:
    """``jobs`` and, for each GEMM among them without a variant of its loads
    and stores, its copy with each one that applies: a masked K tail, a
    rank below its tile, no bias (the forward), the seed as a value and
    64-bit mask counters and the adapters' dropout probabilities (the passes
    with a mask), each row factor (the in-loop passes), split-K's fp32 partials (not on the persistent grid), each on
    its own. The default report compiles these on one tile of each pass;
    this compiles them on every GEMM it compiles, with pointers, TMA, the
    persistent grid and TF32 alike (some are combinations the dispatch never
    launches: a problem there is one only where it does)."""
    out = list(jobs)
    have = {_job_id(j) for j in jobs}
    for job in jobs:
        if job.kernel != "gemm" or not (job.even_k and job.even_r and job.bias and not job.seed_value
                                         and not job.offset_int64 and not job.split_k and not job.row_scale
                                         and not job.adapters and not job.row_p):
            continue
        variants = [dict(even_k=False), dict(even_r=False)]
        if job.pass_name.startswith("forward"):
            variants.append(dict(bias=False))
        if job.pass_name.endswith("_dropout"):
            variants += [dict(seed_value=True), dict(offset_int64=True),
                         ROW_P if "_in_loop" in job.pass_name else ROW_P_IDS_ONLY]
        if "_in_loop" in job.pass_name:
            variants += ROW_FACTORS
        if not job.persistent:
            variants.append(dict(split_k=True))
        for variant in variants:
            copy = dataclasses.replace(job, **variant)
            if _job_id(copy) not in have:
                have.add(_job_id(copy))
                out.append(copy)
    return out


def _job_id(job: Job) -> str:
    return json.dumps(asdict(job), sort_keys=True)


def fp16_twins(jobs: list[Job], results: list[Result]) -> list[Job]:
    """The fp16 copies, not among ``jobs``, of the bf16 jobs whose
    ``results`` come within :data:`FP16_TWIN_REGISTER_MARGIN` registers of
    the limit, spill or fail: they are compiled too."""
    from fused_lora.kernels import configs

    have = {_job_id(j) for j in jobs}
    out = []
    for job, res in zip(jobs, results):
        twin = dataclasses.replace(job, dtype="fp16")
        if job.dtype != "bf16" or _job_id(twin) in have:
            continue
        if (res.error or res.spill_bytes
                or res.registers >= configs.MAX_REGISTERS_PER_THREAD - FP16_TWIN_REGISTER_MARGIN):
            out.append(twin)
    return out


@contextlib.contextmanager
def _compile_pool(jobs: int):
    """Worker processes that compile. Compiling needs the real (JIT) kernels
    whatever the caller runs on, so the workers start without
    TRITON_INTERPRET; the caller's own kernels are left as they are."""
    import multiprocessing

    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, jobs),
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            yield pool
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def run(archs=(90, 80), jobs: int = 1, progress=None, every_fp16_tile: bool = False,
        every_variant: bool = False, scope: str = "tiles") -> list[Result]:
    """Compile every job (and then :func:`fp16_twins`) in ``jobs`` fresh
    worker processes (:func:`_compile_pool`)."""
    work = [j for a in archs for j in jobs_for(a, every_fp16_tile, every_variant, scope)]
    bar = progress(total=len(work), desc="compile", unit="kernel") if progress else None
    try:
        with _compile_pool(jobs) as pool:
            def compile_all(batch: list[Job]) -> list[Result]:
                out = []
                for result in pool.map(compile_job, batch):
                    out.append(result)
                    if bar:
                        bar.update(1)
                return out

            results = compile_all(work)
            twins = fp16_twins(work, results)
            if bar and twins:
                bar.total += len(twins)
            return results + compile_all(twins)
    finally:
        if bar:
            bar.close()


@dataclass(frozen=True)
class KnownProblem:
    """A spill that the ptxas of one Triton (major.minor) takes for occupancy,
    understood and left: :func:`split_known` sets it apart, and
    :func:`check_known` (the CI tests run it with each Triton) compiles the
    kernel again to confirm both that it is still found (a problem that goes
    away leaves the list) and that it is ptxas's trade, not a want of
    registers: with a ceiling of the most registers a thread may have
    (``maxnreg``, configs.MAX_REGISTERS_PER_THREAD; the runtime sets none, and
    ptxas then aims for more programs a SM than the kernel's registers allow
    and spills to reach them), the same kernel spills nothing. An entry names
    one kernel: pass, dtypes, arch, tile, rank tile and the problem's text."""

    triton: str
    kernel: str
    pass_name: str
    dtypes: tuple
    arch: int
    config: dict  # the tile, as the report names it (its fields in the order of the config's dataclass)
    block_r: int
    problem: str  # the text after the kernel's tag
    why: str

    def lines(self) -> list[str]:
        """The problems' lines (:func:`problems`) this entry sets apart."""
        return [f"{self.kernel}/{self.pass_name}/{d}/sm_{self.arch}/{self.config}/r{self.block_r}: {self.problem}"
                for d in self.dtypes]

    def matches(self, line: str, version: str) -> bool:
        return version.startswith(self.triton + ".") and line in self.lines()

    def jobs(self) -> list[Job]:
        """The report's jobs (``--scope tiles``) that compile this entry's kernels, one a dtype."""
        return [job for job in jobs_for(self.arch, scope="tiles")
                if job.kernel == self.kernel and job.dtype in self.dtypes and job.config == self.config
                and job.block_r == self.block_r and result_of(job).pass_name == self.pass_name]


KNOWN_PROBLEMS = (
    KnownProblem("3.6", "skinny", "dA_pass+rank_one", ("bf16", "fp16"), 90,
                 {"block_m": 64, "block_c": 128, "num_warps": 8, "num_stages": 2, "max_block_r": 64,
                  "shrink_stages": 3, "smem_limit": 232448}, 16, "spills 24 bytes",
                 "at r = 1 (the rank a constant) the ptxas that Triton 3.6 bundles (CUDA 12.8's) holds the dA "
                 "pass with dropout at 80 registers, three programs of 8 warps a SM, and spills 12 bytes for it; "
                 "with a ceiling of 255 it takes 144 and spills nothing, and 3.9's takes 112 and none. Moving the "
                 "pass's loads about, or a stride other than 1, gave 80 to 105 registers with and without it: no "
                 "change that holds, in a memory-bound pass at a rank of 1."),
    KnownProblem("3.9", "skinny", "dy_pass-g+rank_one", ("fp16",), 90,
                 {"block_m": 64, "block_c": 128, "num_warps": 8, "num_stages": 2, "max_block_r": 64,
                  "shrink_stages": 3, "smem_limit": 232448}, 16, "spills 16 bytes",
                 "at r = 1 the dy pass for dB alone (TN and the column sums, no g) in fp16: Triton 3.9's ptxas "
                 "holds it at 80 registers, three programs of 8 warps a SM, and spills 8 bytes for it; with a "
                 "ceiling of 255 it takes 138 and spills nothing (96 at a ceiling of 96: two programs), bf16's "
                 "takes 80 and none. ptxas's choice of occupancy in a memory-bound pass, not a want of registers."),
    KnownProblem("3.9", "gemm", "dx+r_tail+nf4_base+rank_loop", ("fp32",), 90,
                 {"block_m": 16, "block_n": 64, "block_k": 32, "group_m": 8, "num_warps": 4, "num_stages": 3,
                  "split_k": 1}, 32, "spills 16 bytes",
                 "fp32's dx over an NF4 base with a rank loop and a rank tail on the 16-row tile: Triton 3.9's "
                 "ptxas holds it at 168 registers, three programs of 4 warps a SM, and spills 8 bytes for it; with "
                 "a ceiling of 255 it takes 184 and spills nothing, and the same pass with a dropout mask, or on "
                 "the 32-row tile, takes 170 to 198 and none. fp32's exact dots are FMA loops that ptxas unrolls "
                 "as far as the registers go: its choice of occupancy, not a want of registers."),
)


def split_known(found: list[str], version: str) -> tuple[list[str], list[str]]:
    """``found`` (:func:`problems`' lines, from Triton ``version``) as
    ``(new, known)``: known, those a :data:`KNOWN_PROBLEMS` entry for that
    Triton matches; the CI check rejects the new ones."""
    known = [line for line in found if any(k.matches(line, version) for k in KNOWN_PROBLEMS)]
    return [line for line in found if line not in known], known


def check_known(version: str, jobs: int = 1, ceiling: int | None = None) -> tuple[list[str], list[Result]]:
    """Each :data:`KNOWN_PROBLEMS` entry of Triton ``version`` (the one
    imported) compiled again, as the report and with a ceiling of ``ceiling``
    registers a thread (default :class:`KnownProblem`'s, the most a thread may
    have): ``(failures, results)``, a failure where an entry names no job, its
    problem is no longer (or not alone) found, or under the ceiling the kernel
    still spills."""
    from fused_lora.kernels import configs

    entries = [k for k in KNOWN_PROBLEMS if version.startswith(k.triton + ".")]
    failures, work = [], []
    for entry in entries:
        found = entry.jobs()
        if len(found) != len(entry.dtypes):
            failures.append(f"{entry.lines()}: {len(found)} job(s) in the report, expected one a dtype")
        work += [(entry, job) for job in found]
    ceiling = ceiling or configs.MAX_REGISTERS_PER_THREAD
    with _compile_pool(jobs) as pool:
        plain = list(pool.map(compile_job, [job for _, job in work]))
        capped = list(pool.map(compile_job, [job for _, job in work], [ceiling] * len(work)))
    capped = [dataclasses.replace(r, pass_name=f"{r.pass_name}+maxnreg_{ceiling}") for r in capped]
    for (entry, _), res, cap in zip(work, plain, capped):
        seen = problems([res])
        if not (len(seen) == 1 and entry.matches(seen[0], version)):
            failures.append(f"{entry.lines()}: compiled, found {seen or 'no problem'}")
        if cap.error or cap.spill_bytes:
            failures.append(f"{entry.lines()}: with maxnreg={ceiling} still "
                            f"{cap.error or f'spills {cap.spill_bytes} bytes at {cap.registers} registers'}")
    return failures, plain + capped


def problems(results: list[Result], smem_limit: int | None = None) -> list[str]:
    """What a CI check rejects: a compile error, shared memory over the
    arch's limit (``smem_limit``, default :func:`~fused_lora.kernels.configs.smem_limit_for`:
    the kernel could not launch) or a GEMM's over the estimate that prunes its
    tiles (:meth:`~fused_lora.kernels.configs.GemmConfig.smem_bytes`: the
    dispatch could pick one that does not fit; the persistent grid, which
    buffers more, runs only with Hopper's), or a skinny pass's over the one
    that fits its stages (:meth:`~fused_lora.kernels.configs.SkinnyConfig.smem_bytes`),
    on any arch; on sm_90, the
    target, also a spill, a 16-bit GEMM without wgmma, a TMA variant without
    TMA copies, a skinny pass or reduction (no column tail) with loads
    narrower than 16-byte vectors, or a DoRA norm (no K tail) whose widest
    loads (W's) are narrower. Other archs' spills are in the table, not
    rejected."""
    from fused_lora.kernels import configs

    out = []
    for r in results:
        tag = f"{r.kernel}/{r.pass_name}/{r.dtype}/sm_{r.arch}/{r.config}/r{r.block_r}"
        if r.error:
            out.append(f"{tag}: {r.error}")
            continue
        limit = smem_limit or configs.smem_limit_for(r.arch)
        if r.shared > limit:
            out.append(f"{tag}: shared memory {r.shared} > {limit}")
        if r.kernel == "gemm" and "+persistent" not in r.pass_name:  # (configs.persistent_grid_fits)
            base_pass = r.pass_name.split("+")[0]
            epilogue_mask = base_pass.startswith("dx") and base_pass.endswith("_dropout")  # (dx's mask)
            estimate = configs.GemmConfig(**r.config).smem_bytes(4 if r.dtype == "fp32" else 2, r.block_r,
                                                                 "_in_loop" in r.pass_name,
                                                                 "+rank_loop" in r.pass_name,
                                                                 "+nf4_base" in r.pass_name, epilogue_mask)
            if r.shared > estimate:
                out.append(f"{tag}: shared memory {r.shared} > the estimate {estimate} that prunes the tiles")
        if r.kernel == "skinny":  # (SkinnyConfig.stages_for)
            estimate = configs.SkinnyConfig(**r.config).smem_bytes(4 if r.dtype == "fp32" else 2, r.block_r)
            if r.shared > estimate:
                out.append(f"{tag}: shared memory {r.shared} > the estimate {estimate} that fits its stages")
        if r.arch != 90:
            continue
        if r.spill_bytes:
            out.append(f"{tag}: spills {r.spill_bytes} bytes")
        if r.kernel == "gemm" and r.arch >= 90 and r.dtype != "fp32" and not r.wgmma:
            out.append(f"{tag}: no wgmma on sm_{r.arch}")
        if r.kernel == "gemm" and "+tma" in r.pass_name and not r.tma:
            out.append(f"{tag}: a TMA variant without TMA copies")
        if r.kernel in ("skinny", "reduce") and not any(tail in r.pass_name for tail in ("+c_tail", "+n_tail")):
            # The memory-bound passes stream their operands in 16-byte vectors: every load
            # (16-bit skinny passes, reductions); fp32 skinny passes read the small
            # rank factor narrower, their wide operand still in vectors; a reduction's
            # second (smaller, masked) sum is read narrower, its first still in vectors;
            # a row factor (a row scale or an adapter id, one fp32 or int32 a row, masked
            # along M) is read 4 bytes at a time, the wide operand in vectors as the same
            # pass without it is (in the report too); at r = 1 the rank factors' rows are
            # one element each, so read one at a time (2 or 4 bytes), the wide operand in vectors.
            widths = r.load_widths or [0]
            some = (r.kernel == "skinny" and (r.dtype == "fp32" or "+row_scale" in r.pass_name
                                              or "+adapters" in r.pass_name or "+row_p" in r.pass_name
                                              or "+rank_one" in r.pass_name)
                    or "+second" in r.pass_name)
            narrow = widths[-1] < 16 if some else widths[0] < 16
            if narrow:
                out.append(f"{tag}: global loads of {widths} bytes, expected 16-byte vectors")
        if r.kernel == "norm" and "+k_tail" not in r.pass_name and (r.load_widths or [0])[-1] < 16:
            # (W, the one wide operand, in 16-byte vectors; B's rows, masked along the rank, narrower)
            out.append(f"{tag}: global loads of {r.load_widths} bytes, expected W's in 16-byte vectors")
    return out


def _table(results: list[Result]) -> str:
    head = ("| arch | kernel | pass | dtype | tiles (M,N|C,K) w/s | r tile | shared B | regs | spill B | wgmma "
            "| load widths B |")
    lines = [head, "|" + "---|" * 11]
    for r in results:
        c = r.config
        tiles = "/".join(str(c[k]) for k in ("block_m", "block_n", "block_c", "block_k", "block_rows", "block_cols")
                         if k in c)
        ws = f"{c.get('num_warps', '')}/{c.get('num_stages', '')}"
        if r.error:
            lines.append(f"| sm_{r.arch} | {r.kernel} | {r.pass_name} | {r.dtype} | {tiles} {ws} | {r.block_r} | "
                         f"ERROR: {r.error} | | | | |")
        else:
            lines.append(f"| sm_{r.arch} | {r.kernel} | {r.pass_name} | {r.dtype} | {tiles} {ws} | {r.block_r} | "
                         f"{r.shared} | {r.registers} | {r.spill_bytes} | {'yes' if r.wgmma else 'no'} | "
                         f"{','.join(map(str, r.load_widths or []))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_lora.compile_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 90 and 80)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--every-fp16-tile", action="store_true",
                        help="compile fp16's sm_90 GEMMs on every tile, not only where their bf16 twins come "
                             "near the register limit (and on the largest tile)")
    parser.add_argument("--every-variant", action="store_true",
                        help="compile the GEMMs' variants (K and rank tails, no bias, the seed as a value, 64-bit "
                             "mask counters, split-K) on every GEMM compiled, not on one tile of each pass")
    parser.add_argument("--scope", choices=SCOPES, default="tiles",
                        help="tiles: every kernel on every tile the dispatch may run it with (the default); "
                             "kernels: every kernel specialisation (pass, rank tile, variant, dtype) once, on the "
                             "tile it runs with at large M; paths: that at the largest rank tile of each only")
    parser.add_argument("--check-known", action="store_true",
                        help="compile only the KNOWN_PROBLEMS of this Triton, as the report and with a ceiling of "
                             "255 registers a thread: each must still be found, and vanish under the ceiling "
                             "(ptxas's trade of a spill for occupancy)")
    parser.add_argument("--warp-specialized", action="store_true",
                        help="compile only the warp-specialised GEMMs bench/gpu_probe.py times (no plan runs them) "
                             "for sm_90: each must compile and Triton's pass take it (setmaxnreg in the PTX); "
                             "their spills are reported")
    args = parser.parse_args(argv)
    if args.warp_specialized and (args.check_known or args.arch or args.every_fp16_tile or args.every_variant
                                  or args.scope != "tiles"):
        parser.error("--warp-specialized compiles its own kernels for sm_90: no --check-known, --arch, --scope, "
                     "--every-fp16-tile or --every-variant")
    if args.check_known and (args.arch or args.every_fp16_tile or args.every_variant or args.scope != "tiles"):
        parser.error("--check-known compiles the kernels KNOWN_PROBLEMS names: no --arch, --scope, "
                     "--every-fp16-tile or --every-variant")
    if args.every_fp16_tile and args.scope != "tiles":
        parser.error(f"--every-fp16-tile compiles fp16's GEMMs on every tile: it needs --scope tiles, "
                     f"not --scope {args.scope}")
    from fused_lora.kernels import configs

    for arch in args.arch or ():
        try:
            configs.smem_limit_for(arch)
        except ValueError as err:
            parser.error(f"--arch {arch}: {err}")
    import triton
    from triton import knobs

    if not hasattr(knobs.nvidia, "dump_ptxas_log"):  # (else every kernel would fail for want of the log)
        parser.error(f"Triton {triton.__version__} does not print the log of the ptxas it runs, from which the report "
                     "reads registers and spills: run it with Triton 3.5 or newer")
    if args.check_known:
        failures, results = check_known(triton.__version__, jobs=args.jobs)
        _print_report(args.json, results, {"failures": failures},
                      f"{len(results) // 2} known problem kernel(s) of Triton {triton.__version__} compiled, as the "
                      f"report and with maxnreg={configs.MAX_REGISTERS_PER_THREAD}: {len(failures)} failure(s)",
                      [("FAILURE", line) for line in failures])
        return 1 if failures else 0
    if args.warp_specialized:
        with _compile_pool(args.jobs) as pool:
            results = list(pool.map(compile_job, warp_specialized_jobs()))
        failures = warp_specialization_problems(results)
        _print_report(args.json, results, {"failures": failures},
                      f"{len(results)} warp-specialised GEMM(s) compiled with Triton {triton.__version__}: "
                      f"{len(failures)} failure(s)", [("FAILURE", line) for line in failures])
        return 1 if failures else 0
    from .cli import progress

    results = run(tuple(args.arch or (90, 80)), jobs=args.jobs, progress=progress,
                  every_fp16_tile=args.every_fp16_tile, every_variant=args.every_variant, scope=args.scope)
    bad, known = split_known(problems(results), triton.__version__)
    _print_report(args.json, results, {"scope": args.scope, "problems": bad, "known_problems": known},
                  f"{len(results)} kernels compiled with Triton {triton.__version__} (--scope {args.scope}), "
                  f"{len(bad)} problem(s), {len(known)} known and left (KNOWN_PROBLEMS)",
                  [("PROBLEM", line) for line in bad] + [("KNOWN", line) for line in known])
    return 1 if bad else 0


def _print_report(as_json: bool, results: list[Result], fields: dict, summary: str, flagged: list) -> None:
    """The report: JSON (this Triton's version, every result and ``fields``),
    or the table, then ``summary`` and the ``flagged`` ``(label, line)``s."""
    import triton

    if as_json:
        print(json.dumps({"triton": triton.__version__, "results": [asdict(r) for r in results], **fields},
                         indent=1))
        return
    print(_table(results))
    print(f"\n{summary}")
    for label, line in flagged:
        print(f"  {label:<7}", line)


if __name__ == "__main__":
    sys.exit(main())
