r"""The fused LoRA linear: the math, the PyTorch ops and the autograd Function.

The math (PEFT's conventions; every kernel refers here)
========================================================

Shapes: ``x (..., K)`` flattened row-major to ``(M, K)``; frozen ``W (N, K)``;
bias ``b (N)``; ``A (r, K)`` (``lora_A``); ``B (N, r)`` (``lora_B``); scaling
``s`` (``alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA); dropout probability
``p`` on the LoRA path only, with keep-mask ``mask (M, K)`` drawn from a seed::

    drop(x) = x ⊙ mask / (1 - p)                                         (M, K)

    forward   xa = w ⊙ drop(x) Aᵀ                                         (M, r)   tiny, kept for backward
              y  = x Wᵀ + b + s · xa Bᵀ                                   (M, N)

    backward  g  = s · w ⊙ dy B                                           (M, r)
              dx = dy W + (g A) ⊙ mask / (1 - p)                          (M, K)   the forward GEMM, roles swapped
              dA = gᵀ drop(x)                                             (r, K)
              dB = s · dyᵀ xa                                             (N, r)
              dW = dyᵀ x,   db = Σ_m dy                                   only when the base is trainable

``w`` (M, r) scales the low-rank term's rank columns row by row; 1 when
absent. It is one of two forms (never both):

* the row scale ``row_scale`` (M,), the same on a row's every column: 0 on a
  row runs the base alone there, which is how a batch mixing a layer's
  adapter with the bare base (PEFT's ``adapter_names``) runs as one batch;
* several adapters side by side (:func:`multi_lora_linear`): adapter ``i``
  of rank ``r_i`` and scale ``s_i`` owns ``r_i`` consecutive rank columns
  (A, B, r their concatenation, ``s`` 1), and row m, of adapter ``id_m``
  (-1: none), has ``w[m, j] = s_i`` on the columns of adapter ``i = id_m``
  and 0 on the others: each row gets its own adapter's update alone, every
  adapter its gradients from its own rows alone, in one set of launches.
  (Where ``w`` is 0 the term is 0 by selection, not by product: a row's
  NaN or Inf stays out of the other adapters' columns of ``xa`` and ``g``;
  the gradient GEMMs still multiply by those zeros, as any GEMM does. An
  id below -1 gives its row NaN. A row of no adapter's has id -1, so no
  row scale is needed beside the ids.) Each adapter may have its own
  dropout probability ``p_i`` (``adapter_p``): row m's mask is drawn with
  ``p_{id_m}`` (the same random numbers, its own threshold: 1 on a row of
  no adapter's), and its ``1 / (1 - p_i)`` moves into ``w``, ``w[m, j] =
  s_i / (1 - p_i)``, the ``1 / (1 - p)`` above then 1: ``xa``, ``g``, dA,
  dB and dx are the same products, each row's term its own adapter's.
  Several adapters summed on every row (:func:`summed_lora_linear`, PEFT's
  several active adapters) are that form with every row's id the same and
  every column its: ``w[m, j] = s_i`` on adapter i's columns, every row.

The kernels apply ``w`` to ``xa`` and ``g`` where they make them (the
skinny pass's store, or after the K loop of a GEMM that accumulates them),
so every strategy takes it; dA and dB then need nothing more.

DoRA (:func:`dora_linear`; PEFT's ``use_dora=True``) rescales each output
feature of the adapted weight to a trained magnitude ``m (N)``, its norm
taken over K and detached (DoRA §4.3, as PEFT)::

    ν  = ‖W + s · B A‖ per row                                            (N)      no gradient, in fp32
    γ  = m / ν                                                            (N)
    y  = x Wᵀ + b + (γ - 1) ⊙ drop(x) Wᵀ + γ ⊙ s · drop(x) Aᵀ Bᵀ                   PEFT's form
       = γ ⊙ z + (x - drop(x)) Wᵀ + b,   z = drop(x) Wᵀ + s · drop(x) Aᵀ Bᵀ          (M, N)

(PEFT applies its correction ``(γ - 1) ⊙ ·Wᵀ`` to drop(x). ``z`` is the
fused op above on drop(x), without bias or dropout of its own; with p = 0,
``y = γ ⊙ z + b``.) Backward: ``dz = γ ⊙ dy`` (then the fused backward
above), ``dm = Σ_m dy ⊙ z / ν``; the second GEMM's dx through
``x - drop(x)``. Several adapters, some DoRA (:func:`multi_lora_linear`'s
``magnitude``): row m of adapter ``i = id_m`` takes ``γ_i = m_i / ν_i``
(``ν_i = ‖W + s_i · B_i A_i‖``), 1 where adapter i is plain LoRA or the
row has none; ``z`` is the side-by-side op above on drop(x) (row m dropped
with ``p_i``, no ``1 / (1 - p_i)`` in ``w`` then) and
``y[m] = γ_{id_m} ⊙ z[m] + (x - drop(x))[m] Wᵀ + b``: each row its own
adapter's DoRA (or LoRA) output; ``dm_i = Σ_{m: id_m = i} dy ⊙ z / ν_i``.
The norm takes one read of W (one for every DoRA adapter of a call:
each W tile takes each adapter's ``s_i·B_i A_i`` in turn), ``s·BA`` added to each
of its tiles in fp32 and never stored (:mod:`fused_lora.kernels.dora`;
:func:`dora_norm`, for a layer's init and merge, makes ``W + s·BA`` in
fp32 a block of rows at a time).

An int8 base (``weight_scale``; :mod:`fused_lora.quant`): ``W`` above is
``Ŵ = round(q ⊙ scale[:, None])`` in x's dtype, ``q (N, K)`` int8 and
``scale (N)``, the product made in fp32 and rounded once; q and the scale
are frozen (no ``dW``). The GEMMs make Ŵ's tiles as they load q's
(the forward's ``Wᵀ`` scaled by column, dx's ``W`` by row), so every
result is the one on Ŵ itself. An NF4 base likewise: ``Ŵ[n, k] =
round(code[q[n, k]] · absmax[n, k // G])``, q's 4-bit indices packed
two a byte ((N, K/2) uint8), ``absmax (N, K/G)``, ``code`` the 16 values
of the indices (``weight_code``: NF4's when None, or bitsandbytes' FP4...).

How it runs (Triton backend)
============================

* forward: ``y`` is one GEMM whose fp32 accumulator also receives ``s·xa·Bᵀ``
  and ``b``; ``xa`` comes from a second dot inside the K loop (``in_loop``;
  with dropout each N tile masks its x tiles for that dot) or from the skinny
  pass over x, which draws the dropout mask once (``split``).
  Where cuBLAS is the better base GEMM (``hybrid``), the kernel writes the
  low-rank term and cuBLAS adds ``x·Wᵀ`` onto it. See :mod:`fused_lora.dispatch`.
* backward: the *dy pass* reads dy once for ``g``, ``dB`` (and ``db``); the dx
  GEMM is the forward kernel with (x, Wᵀ, xa, Bᵀ) replaced by (dy, W, g, A) and
  the mask regenerated in its epilogue (at small M it runs like the in-loop
  forward: ``dy·B`` accumulated in its K loop, and the dy pass keeps only dB
  and db); the *dA pass* reads x once,
  regenerating the mask. ``drop(x)`` and the mask are never stored; nothing of
  size (M, K) or (M, N) is saved beyond x itself (but by the eager ``cublas``
  calls below). Reductions over M use split
  partials summed in a fixed order: no atomics, bitwise reproducible.
* a quantized base: the forward's and dx's GEMMs dequantise its tiles in
  their K loops (int8 always; NF4 up to
  :data:`~fused_lora.kernels.configs.NF4_DECODE_MAX_M` rows, ``split``);
  above that an NF4 base is made whole once a pass by the dequantisation
  kernel and the float base's plan runs on Ŵ (the same values either way).
* an eager call on a CUDA device below a size (16-bit; float32 at any size:
  :func:`fused_lora.dispatch.eager_cublas_reason`; plain LoRA on a float
  base): ``xa = x·Aᵀ``, ``y = b + x·Wᵀ``, ``y += s·xa·Bᵀ`` on cuBLAS (with
  dropout ``xa = (x ⊙ keep)·Aᵀ`` and ``s/(1-p)``, the mask ``keep`` written
  by the keep-mask pass), recorded for autograd, which differentiates them
  itself (:func:`_eager_cublas`): the host's time decides such steps, and
  this spends the least of it. With dropout autograd keeps ``keep`` and
  ``x ⊙ keep`` for its backward, as PyTorch's dropout does, so only up to
  :data:`fused_lora.dispatch.EAGER_KEPT_MASK_MAX_M` tokens (small there);
  above, the Function's ``cublas`` passes run the same products, the
  backward drawing the mask again. Either primes the Triton plan that a
  call captured in a CUDA graph runs instead.
* ``create_graph=True`` (gradients to differentiate again): autograd's
  backward of the reference (:mod:`fused_lora.reference`) instead of the
  kernels, so that the gradients can be differentiated with respect to dy
  and every input.

Two PyTorch ops carry the kernels, ``fused_lora::lora_linear_fwd`` and
``fused_lora::lora_linear_bwd`` (custom ops with fake implementations, so
``torch.compile`` traces through them); the forward op has its autograd
registered, and :class:`LoRALinearFunction` exposes the same pair as a
``torch.autograd.Function``, which checks its arguments (the functions here
apply it unchecked, having checked theirs). In plain eager mode that Function runs the two
passes without the ops' dispatcher, which would only add host time; while
torch.compile traces, under dispatch modes (fake tensors...), tensor
subclasses or the profiler it calls the ops (:func:`direct_call`). Where
nothing is to be differentiated (``torch.no_grad``, inference), plain eager
calls run the forward pass without the Function at all.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import warnings
from collections.abc import Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _triton, dispatch
from ._validate import (check_adapter_ids, check_backend, check_lora_args, check_magnitude, check_row_scale,
                        check_scaling, check_weight_code, check_weight_scale)
from .dropout import check_dropout_p, check_seed, draw_seed_tensor
from .quant import base_format, base_shape, dequantize_base, nf4_code
from .reference import dora_dropped, dora_linear_checked, lora_linear_checked, multi_dora_linear_checked

Tensor = torch.Tensor


# ----------------------------------------------------------------------------
# The Triton backend: forward and backward passes
# ----------------------------------------------------------------------------

def _flatten(t: Tensor, cols: int) -> Tensor:
    """(..., cols) -> (M, cols): a view whenever the leading dims allow one."""
    return t.reshape(t.shape[:-1].numel(), cols)


def _unflatten_output(y2: Tensor, like: Tensor) -> Tensor:
    """The kernels' (M, N) output as ``(*like.shape[:-1], N)``, and not a view:
    a caller may change a layer's output in place (``y += residual``), as
    nn.Linear's, and autograd refuses that on an autograd Function's output
    that is a view. (``aten._unsafe_view``: the same memory, without the view
    relation; it is what ``torch.matmul`` returns its folded results with.)"""
    if like.dim() == 2:
        return y2
    return torch.ops.aten._unsafe_view(y2, (*like.shape[:-1], y2.shape[1]))


def _row_vector(row_scale: Tensor | None, m: int) -> Tensor | None:
    """``w`` as the kernels read it: fp32 (M,), any stride (a view of the
    caller's where its strides allow; one copy else)."""
    if row_scale is None:
        return None
    w = row_scale.reshape(m)
    return w if w.dtype == torch.float32 else w.to(torch.float32)


def _adapter_columns(adapter_ids: Tensor | None, rank_ids: Tensor | None, rank_scaling: Tensor | None,
                     m: int):
    """The adapters' columns as the kernels read them
    (:class:`fused_lora.kernels.common.AdapterColumns`: int32 row ids, any
    stride; contiguous int32 column ids and fp32 column scales), or None."""
    if adapter_ids is None:
        return None
    from .kernels.common import AdapterColumns

    row_ids = adapter_ids.reshape(m)
    return AdapterColumns(row_ids if row_ids.dtype == torch.int32 else row_ids.to(torch.int32),
                          rank_ids.to(torch.int32).contiguous(), rank_scaling.to(torch.float32).contiguous())


def _dropout_rows(adapters, adapter_p: Tensor | None, dropout_p: float):
    """``(dropout_rows, keep_scale)`` of a pass: the adapters' own dropout
    probabilities as the kernels read them
    (:class:`fused_lora.kernels.common.DropoutRows`, by the adapters' row
    ids; their ``1 / (1 - p_i)`` in the column scales already) and 1; or
    None and ``1 / (1 - dropout_p)``."""
    if adapter_p is None or dropout_p == 0.0:
        return None, 1.0 / (1.0 - dropout_p)
    from .kernels.common import DropoutRows

    return DropoutRows(adapters.row_ids, adapter_p.to(torch.float32).contiguous()), 1.0


def _on_the_operands_device(pass_fn):
    """Runs a Triton pass with its first operand's GPU as the current CUDA
    device. Triton launches on the current device, not on the operands':
    a layer on cuda:1 while cuda:0 is current (a model spread over GPUs by a
    ``device_map``, pipeline stages) would launch there, and Triton would
    refuse the pointers or, with peer access, read them from the wrong GPU
    on that GPU's stream, unordered with the work that made them."""
    @functools.wraps(pass_fn)
    def run(t: Tensor, *args, **kwargs):
        device = t.device
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return pass_fn(t, *args, **kwargs)
        return pass_fn(t, *args, **kwargs)

    return run


@_on_the_operands_device
def forward_triton(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                   scaling: float, dropout_p: float, seed: int | Tensor,
                   strategy: str = "", row_scale: Tensor | None = None, adapter_ids: Tensor | None = None,
                   rank_ids: Tensor | None = None, rank_scaling: Tensor | None = None,
                   weight_scale: Tensor | None = None, weight_code: Tensor | None = None,
                   adapter_p: Tensor | None = None, _plan: dispatch.Plan | None = None) -> tuple[Tensor, Tensor]:
    """``(y, xa)`` of the math above, with the Triton kernels. ``strategy``:
    a forced one (:func:`fused_lora.dispatch.force_strategy`), ``""``: none.
    ``row_scale``: of x's leading shape, or None; ``adapter_ids`` (x's
    leading shape), ``rank_ids`` and ``rank_scaling`` (r,): the adapters'
    factor of ``w``, or None; ``weight_scale``: an int8 weight's (N,) or a
    4-bit weight's (N, K / group) (the GEMM dequantises its tiles), or None;
    ``weight_code``: a 4-bit weight's code book, None for NF4; ``adapter_p``
    (n,) fp32: each adapter's dropout probability (``dropout_p`` then the
    largest, ``rank_scaling`` holding each ``1 / (1 - p_i)``), or None.
    (``_plan``: the plan to run, :func:`_eager_plan`'s priming.)"""
    k_ = _triton.get()
    n, k = base_shape(weight)
    r = lora_A.shape[0]
    x2 = _flatten(x, k)
    m = x2.shape[0]
    plan = _plan
    if plan is None:
        plain = row_scale is None and adapter_ids is None and adapter_p is None
        plan = _eager_plan(plan_for(x2, weight, r, dropout_p, strategy, weight_scale, plain=plain),
                           _forward_operands(x2, weight, bias, lora_A, lora_B, _seed_kind(seed, dropout_p)),
                           lambda triton: forward_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed,
                                                         _plan=triton))
    if plan.strategy == "cublas":
        y2, xa = forward_cublas(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        xa = xa.float() if dropout_p == 0.0 else xa.float().mul_(1.0 / (1.0 - dropout_p))  # (drop(x)·Aᵀ)
        return _unflatten_output(y2, x), xa.view(*x.shape[:-1], r)
    weight, weight_scale, code = _base_operands(k_, plan, weight, weight_scale, x.dtype, weight_code)
    w = _row_vector(row_scale, m)
    adapters = _adapter_columns(adapter_ids, rank_ids, rank_scaling, m)
    rows_p, keep_scale = _dropout_rows(adapters, adapter_p, dropout_p)
    tune = dict(m=m, n=n, r=r, dtype=x.dtype, epilogue_mask=False, device=x.device, persistent=plan.persistent,
                **_quantized_b(weight, weight_scale))
    if plan.strategy == "in_loop":
        # (with dropout: xa = drop(x)·Aᵀ, each N tile masking its x tiles for the shrink's dot)
        def launch(config):
            return k_.lora_gemm(x2, weight.t(), bias=bias, shrink=lora_A.t(), v=lora_B.t(), lr_scale=scaling,
                                dropout_p=dropout_p, seed=seed, shrink_dropout=True, row_scale=w,
                                adapters=adapters, dropout_rows=rows_p, b_scale=weight_scale, b_code=code, config=config,
                                out_dtype=x.dtype, input_precision=plan.input_precision, tma=plan.tma,
                                tma_device=plan.tma_device, persistent=plan.persistent, num_sms=plan.num_sms)

        y2, xa = launch(dispatch.gemm_config_for("forward", plan.fwd_gemm, launch, k=k, shrink_in_loop=True,
                                                 shrink_mask=dropout_p > 0.0, **tune))
    else:
        xa, _, _ = k_.skinny_pass(x2, shrink=lora_A.t(), sh_scale=keep_scale, row_scale=w,
                                  adapters=adapters, dropout_rows=rows_p, dropout_p=dropout_p, seed=seed,
                                  config=plan.skinny,
                                  target_programs=plan.skinny_programs, input_precision=plan.input_precision)
        # hybrid: an empty K loop (the kernel writes C = s·xa·Bᵀ + b), then cuBLAS adds x·Wᵀ in place
        a, b = (x2[:, :0], weight.t()[:0]) if plan.cublas_base else (x2, weight.t())

        def launch(config):
            return k_.lora_gemm(a, b, bias=bias, u=xa, v=lora_B.t(), lr_scale=scaling, b_scale=weight_scale,
                                b_code=code, config=config, out_dtype=x.dtype, input_precision=plan.input_precision,
                                tma=plan.tma, tma_device=plan.tma_device, persistent=plan.persistent,
                                num_sms=plan.num_sms)

        y2, _ = launch(dispatch.gemm_config_for("forward", plan.fwd_gemm, launch, k=a.shape[1],
                                                shrink_in_loop=False, **tune))
        if plan.cublas_base:
            y2.addmm_(x2, weight.t())
    return _unflatten_output(y2, x), xa.view(*x.shape[:-1], r)


def forward_cublas(x2: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                   scaling: float, dropout_p: float = 0.0, seed: int | Tensor = 0) -> tuple[Tensor, Tensor]:
    """``(y2, xa)`` of the math above (no row scale, no adapters) on cuBLAS,
    strategy ``cublas``: ``xa = x·Aᵀ`` in x's dtype, ``y = b + x·Wᵀ``, then
    ``y += s·xa·Bᵀ`` in place (three products, no Triton launch;
    :func:`fused_lora.dispatch.eager_cublas_reason` says where eager calls
    run it). With dropout, the keep-mask pass draws the mask ``keep`` (M, K)
    (:func:`_keep`, one launch), and ``xa = (x ⊙ keep)·Aᵀ``, ``y +=
    s/(1-p)·xa·Bᵀ``: this xa is ``(1 - p)·drop(x)·Aᵀ``. x2 (M, K), all in
    one float dtype. (The passes hand xa on in fp32, as the kernels' (its
    values the rounded product's); :func:`_eager_cublas` records these
    products for autograd, which keeps ``keep`` and ``x ⊙ keep`` for its
    backward.)"""
    xa = torch.mm(x2 if dropout_p == 0.0 else x2 * _keep(x2, dropout_p, seed), lora_A.t())
    y2 = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
    y2.addmm_(xa, lora_B.t(), alpha=scaling if dropout_p == 0.0 else scaling / (1.0 - dropout_p))
    return y2, xa


@_on_the_operands_device
def _keep(x2: Tensor, dropout_p: float, seed: int | Tensor) -> Tensor:
    """The keep-mask of x2 (M, K), bool: :func:`fused_lora.dropout_mask`'s,
    which every pass draws, from the keep-mask pass (one launch)."""
    return _triton.get().keep_mask_tensor(x2.shape[0], x2.shape[1], dropout_p, seed, x2.device)


def backward_cublas(dy2: Tensor, x2: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa2: Tensor,
                    scaling: float, need_x: bool, need_weight: bool, need_bias: bool, need_A: bool, need_B: bool,
                    dropout_p: float = 0.0, seed: int | Tensor = 0, xa_factor: float = 1.0):
    """``(dx2, dW, db, dA, dB)`` of :func:`forward_cublas` on cuBLAS (None
    where not needed): ``g = dy·B``; ``dx = dy·W + s·g·A`` (one product, then
    one in place), ``dA = s·gᵀ·x``, ``dB = s·dyᵀ·xa`` (xa in dy's dtype),
    ``db = Σ dy``, ``dW = dyᵀ·x``. With dropout, the keep-mask pass draws
    ``keep`` again, ``dA = s/(1-p)·gᵀ·(x ⊙ keep)`` and ``dx = dy·W +
    s/(1-p)·(g·A) ⊙ keep``: ``(g·A) ⊙ keep``, then ``dy·W`` added to it in
    place (cuBLAS's C, scaled by ``s/(1-p)``), dA first, so that at most two
    buffers of x's size are live at once (the mask, a byte an element, and
    one of x's dtype: ``x ⊙ keep``, then dx). dy2 (M, N), x2 (M, K), xa2
    (M, r): ``drop(x)·Aᵀ / xa_factor``, the forward pass's (the Triton
    plan's and the generic Function's: drop(x)·Aᵀ in fp32, ``xa_factor``
    1; :class:`_LoRALinearCublasFunction`'s: :func:`forward_cublas`'s xa as
    it made it, ``(x ⊙ keep)·Aᵀ`` in x's dtype, ``xa_factor`` 1/(1-p))."""
    g = torch.mm(dy2, lora_B) if need_x or need_A else None
    keep = _keep(x2, dropout_p, seed) if dropout_p > 0.0 and g is not None else None
    lr_scale = scaling if keep is None else scaling / (1.0 - dropout_p)
    dx2 = d_w = d_bias = d_a = d_b = None
    if need_A:
        d_a = torch.mm(g.t(), x2 if keep is None else x2 * keep).mul_(lr_scale)
    if need_x:
        if keep is None:
            dx2 = torch.mm(dy2, weight)
            dx2.addmm_(g, lora_A, alpha=scaling)
        else:
            dx2 = torch.mm(g, lora_A).mul_(keep).addmm_(dy2, weight, beta=lr_scale)
    keep = None  # (the mask's bytes freed before dW's product)
    if need_B:
        d_b = torch.mm(dy2.t(), xa2.to(dy2.dtype)).mul_(scaling * xa_factor)
    if need_bias:
        d_bias = dy2.sum(0)
    if need_weight:
        d_w = torch.mm(dy2.t(), x2)
    return dx2, d_w, d_bias, d_a, d_b


def _base_kind(weight: Tensor, weight_scale: Tensor | None) -> str:
    """The dispatch's ``quantized``: ``""``, ``"int8"`` or ``"nf4"``."""
    return "" if weight_scale is None else base_format(weight)


def _quantized_b(weight: Tensor, weight_scale: Tensor | None) -> dict:
    """The GEMM tiles' ``int8_b`` and ``nf4_b`` for the base the GEMMs read."""
    return dict(int8_b=weight_scale is not None and weight.dtype == torch.int8,
                nf4_b=weight_scale is not None and weight.dtype == torch.uint8)


def _base_operands(k_, plan, weight: Tensor, weight_scale: Tensor | None, dtype: torch.dtype,
                   weight_code: Tensor | None = None):
    """``(weight, weight_scale, code)`` for the GEMMs: the base as it is (a
    4-bit one with its code book, fp32 (16,): ``weight_code``'s, or NF4's),
    or, where the plan says so, Ŵ made whole in ``dtype`` (the same values
    the GEMMs' decoding makes), as a float base."""
    if weight_scale is None:
        return weight, None, None
    code = _kernel_code(weight, weight_code)
    if plan.dequantize_base:
        return k_.dequantize_weight(weight, weight_scale, dtype, code), None, None
    return weight, weight_scale, code


def _kernel_code(weight: Tensor, weight_code: Tensor | None) -> Tensor | None:
    """The code book the kernels read for a quantized ``weight``: None (int8),
    else fp32 (16,) contiguous, NF4's where ``weight_code`` is None."""
    if weight.dtype != torch.uint8:
        return None
    if weight_code is None:
        return nf4_code(weight.device)
    return weight_code if weight_code.dtype == torch.float32 and weight_code.is_contiguous() else \
        weight_code.to(torch.float32).contiguous()


def plan_for(x2: Tensor, weight: Tensor, r: int, dropout_p: float, strategy: str = "",
             weight_scale: Tensor | None = None, dy: Tensor | None = None, plain: bool = False) -> dispatch.Plan:
    """The plan the passes run for these operands: x2 (M, K), ``weight``
    (a quantized one with its ``weight_scale``), and, for the backward, dy
    (M, N). :func:`fused_lora.dispatch.device_plan` of their shapes, told
    whether TMA can read the in-loop GEMM's operands (the forward's x and W,
    dx's dy and W): on a CUDA device of sm_90+ the in-loop shrink through
    pointer loads runs split instead; and, on a CUDA device where torch
    lets cuBLAS run (:func:`cublas_deterministic`), that ``plain`` calls (no
    row scale, no adapters side by side) may run ``cublas``: eager ones do,
    captured ones where their Triton plan is not primed (:func:`_eager_plan`)."""
    n, k = base_shape(weight)
    a = x2 if dy is None else dy
    return dispatch.device_plan(x2.device, x2.shape[0], n, k, r, x2.dtype, dropout_p, strategy or None,
                                quantized=_base_kind(weight, weight_scale),
                                tma_readable=lambda: _triton.get().tma_readable(a, weight),
                                eager=eager_rule_applies(x2.device), plain=plain)


def eager_rule_applies(device: torch.device) -> bool:
    """Whether plain calls on ``device`` may run ``cublas`` by the dispatch's
    eager rule (:func:`fused_lora.dispatch.eager_cublas_reason`): on a CUDA
    device, where torch lets cuBLAS run (:func:`cublas_deterministic`)."""
    return device.type == "cuda" and cublas_deterministic()


#: priming key (:func:`_priming_key`) -> the Triton plan its eager call
#: primed (None: priming failed, not tried again). Bounded.
_primed: dict = {}


def _forward_operands(x2: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                      seed_kind) -> tuple:
    """What keys the priming of a forward pass (:func:`_eager_plan`);
    ``seed_kind``: :func:`_seed_kind`'s."""
    return "forward", x2.device, x2, weight, bias, lora_A, lora_B, seed_kind


def _backward_operands(dy2: Tensor, x2: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa2: Tensor,
                       needs: tuple, seed_kind) -> tuple:
    """What keys the priming of a backward pass (:func:`_eager_plan`)."""
    return "backward", x2.device, dy2, x2, weight, lora_A, lora_B, xa2, needs, seed_kind


def _seed_kind(seed, dropout_p: float):
    """What a pass's kernels are specialised on of its seed (never its
    value): nothing without dropout; else a seed tensor's dtype (the kernels
    read it through a pointer: a drawn seed's int32), or an int's width."""
    if dropout_p == 0.0:
        return None
    if isinstance(seed, Tensor):
        return seed.dtype
    return "i32" if seed < 2**31 else "i64"


def _layout(t):
    """A tensor operand's part of a priming key: dtype, shape, strides, 16-byte
    alignment (anything else as it is)."""
    return (t.dtype, t.shape, t.stride(), t.data_ptr() & 15) if isinstance(t, Tensor) else t


def _priming_key(triton: dispatch.Plan, operands: tuple) -> tuple:
    """The priming key of a pass of ``operands`` on the Triton plan ``triton``
    (an operand given as its :func:`_layout` already counts the same)."""
    return id(triton), tuple(map(_layout, operands))


def _eager_plan(plan: dispatch.Plan, operands: tuple, prime) -> dispatch.Plan:
    """The plan a pass runs, from ``plan_for``'s: where that is an eager
    call's ``cublas`` (``plan.captured``, the Triton plan, set), an eager
    call runs it, having primed the Triton plan's kernels once for these
    operands (``prime(triton_plan)`` runs the pass on that plan inside
    :func:`fused_lora.kernels.launch.priming`: every kernel compiled and
    loaded, none run); a call being captured into a CUDA graph runs the
    Triton plan where an eager call primed it, else ``cublas`` as well (CUDA
    refuses to load a module mid-capture: "operation not permitted when
    stream is capturing"). ``operands``: :func:`_forward_operands` or
    :func:`_backward_operands`: the pass's name, its device (a module is
    loaded per GPU), its tensors (None for none) and anything else its
    kernels depend on; their dtypes, shapes, strides and 16-byte alignment
    key the priming (what Triton specialises a launch on follows from
    them)."""
    triton = plan.captured
    if triton is None:
        return plan
    key = _priming_key(triton, operands)
    if torch.cuda.is_current_stream_capturing():
        return triton if _primed.get(key) is triton else plan
    _prime(key, triton, operands[0], prime)
    return plan


def _prime(key: tuple, triton: dispatch.Plan, what: str, prime) -> None:
    """``prime(triton)`` inside :func:`fused_lora.kernels.launch.priming`,
    once for ``key`` (:func:`_eager_plan`); a failure warns, once."""
    if key in _primed:
        return
    if len(_primed) >= 4096:
        _primed.clear()
        _eager_calls.clear()  # (which remember what they primed)
    _primed[key] = None
    try:
        with _triton.get().launch.priming():
            prime(triton)
    except Exception as exc:  # (the eager call runs cuBLAS all the same; a captured one will too)
        warnings.warn(f"fused_lora: priming the Triton kernels of the {what} for CUDA graphs failed "
                      f"({type(exc).__name__}: {exc}); calls captured in a graph run cuBLAS's products there",
                      RuntimeWarning, stacklevel=3)
    else:
        _primed[key] = triton


#: (:func:`_forward_operands`' layouts, :func:`fused_lora.dispatch.switches_state`)
#: -> the ``needs`` (the gradients asked for) whose backward an eager call of
#: that layout primed (:func:`_eager_cublas`, by the rule: its forward
#: primed), True (forced: nothing to prime), or None where such a call runs
#: its plan. Bounded.
_eager_calls: dict = {}


def _eager_cublas(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None,
                  scaling: float, dropout_p: float, seed: int | Tensor, differentiated: bool) -> Tensor | None:
    """y of a plain call (a float base, no row scale, no adapters) that runs
    ``cublas``, by the eager rule
    (:func:`fused_lora.dispatch.eager_cublas_reason`) or forced
    (:func:`fused_lora.dispatch.force_strategy`), or None where it does not
    (then the autograd Function runs its plan): :func:`forward_cublas`'s
    three products (with dropout, after the keep-mask pass and ``x ⊙
    keep``) recorded by autograd, which differentiates them with its own
    backward (:func:`backward_cublas`'s products), with no Python of
    fused_lora's in it; with dropout it keeps the mask and ``x ⊙ keep`` for
    that backward, as PyTorch's dropout does, so only up to
    :data:`fused_lora.dispatch.EAGER_KEPT_MASK_MAX_M` tokens
    (:func:`fused_lora.dispatch.eager_records`; above,
    :class:`_LoRALinearCublasFunction` runs :func:`forward_cublas` and
    :func:`backward_cublas`, the mask drawn again in the backward, nothing
    of x's size kept). Where the rule applies, the host's time decides a
    step, and there the generic Function's Python, forward and backward
    (its plan and priming key asked at each pass, its checks of a dozen
    operands), cost more than the products' launches. ``seed``: the
    call's (drawn already where it was None), any value without dropout;
    ``differentiated``: grad mode on and an operand requiring its gradient
    (else the products run alone, nothing recorded).

    Applies to an eager call (:func:`direct_call`, no CUDA graph being
    captured) whose x flattens without a copy (autograd would keep the copy
    for the backward). By the rule, like the Function's ``cublas`` passes,
    it primes the Triton plan that a call captured in a CUDA graph runs
    (:func:`_eager_plan`): the forward's at the first call of a layout; the
    backward's in a hook on y that the calls register until a backward has
    run it (dy's layout is part of that pass's key), for the gradients the
    Function's backward would be asked for. (Forced, a captured call runs
    ``cublas`` too: nothing to prime.)"""
    # (direct_call first: while torch.compile traces, nothing else here is asked)
    if not direct_call(x, weight, bias, lora_A, lora_B):
        return None
    forced = dispatch.forced_strategy()
    if forced is None:
        if not eager_rule_applies(x.device) or torch.cuda.is_current_stream_capturing():
            return None
    elif forced != "cublas" or _capturing(x.device):
        return None
    n, k = weight.shape
    if x.dim() == 2:
        x2 = x
    elif x.is_contiguous():
        x2 = x.view(-1, k)
    else:
        return None
    records = dispatch.eager_records(x2.shape[0], dropout_p)
    seed_kind = _seed_kind(seed, dropout_p)
    operands = tuple(map(_layout, _forward_operands(x2, weight, bias, lora_A, lora_B, seed_kind)))
    layout = (operands, dispatch.switches_state())
    primed = _eager_calls.get(layout, False)
    if primed is False:  # (the plan and the forward's priming, once a layout: plan_for costs the host µs)
        plan = plan_for(x2, weight, lora_A.shape[0], dropout_p, plain=True)
        if plan.strategy != "cublas":
            primed = None
        elif plan.captured is None:  # (forced)
            primed = True
        else:
            primed = set()
            _prime(_priming_key(plan.captured, operands), plan.captured, "forward", lambda triton: forward_triton(
                x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, _plan=triton))
        if len(_eager_calls) >= 4096:
            _eager_calls.clear()
        _eager_calls[layout] = primed
    if primed is None:
        return None
    if records or not differentiated:
        y2, _ = forward_cublas(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    else:
        y2 = _LoRALinearCublasFunction.apply(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    if primed is not True and y2.requires_grad:
        needs = (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad,
                 lora_A.requires_grad, lora_B.requires_grad)
        if needs not in primed:
            y2.register_hook(functools.partial(_prime_backward, primed, needs, x2, weight, lora_A, lora_B, scaling,
                                               dropout_p, seed))
    return y2 if x.dim() == 2 else y2.view(*x.shape[:-1], n)


class _LoRALinearCublasFunction(torch.autograd.Function):
    """An eager ``cublas`` call with dropout above
    :data:`fused_lora.dispatch.EAGER_KEPT_MASK_MAX_M` tokens
    (:func:`_eager_cublas`): :func:`forward_cublas`, then
    :func:`backward_cublas` with the mask drawn again from the seed; keeps
    x2, the weights, the (M, r) ``(x ⊙ keep)·Aᵀ`` in x's dtype and a seed
    tensor. No plan asked, no priming key made (the caller primed): what the
    generic Function's passes cost the host at every step."""

    @staticmethod
    def forward(ctx, x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        y2, xa = forward_cublas(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        seed_t = seed if isinstance(seed, Tensor) else None  # (a tensor saved as such, an int on ctx)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, xa, seed_t)
        ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None
        ctx.seed = seed if seed_t is None else None
        return y2

    @staticmethod
    def backward(ctx, dy2):
        x2, weight, lora_A, lora_B, xa, seed_t = ctx.saved_tensors
        seed = ctx.seed if seed_t is None else seed_t
        need = list(ctx.needs_input_grad[:5])
        need[2] = need[2] and ctx.has_bias
        if torch.is_grad_enabled():  # create_graph=True
            grads = _differentiable_gradients(dy2, x2, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed,
                                              need, None, (), None)
        else:
            grads = backward_cublas(dy2, x2, weight, lora_A, lora_B, xa, ctx.scaling, *need, ctx.dropout_p, seed,
                                    xa_factor=1.0 / (1.0 - ctx.dropout_p))
        return (*grads, None, None, None)


def _prime_backward(primed: set, needs: tuple, x2: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                    scaling: float, dropout_p: float, seed: int | Tensor, dy2: Tensor) -> None:
    """:func:`_eager_cublas`'s hook on y2: primes the backward's Triton plan
    for this dy2 (M, N) as :func:`backward_triton` does (xa an fp32 (M, r),
    as the forward's kernels make it), once for ``needs`` (then in
    ``primed``)."""
    if needs in primed or torch.cuda.is_current_stream_capturing():  # (no module loads there)
        return
    primed.add(needs)
    xa2 = torch.empty((x2.shape[0], lora_A.shape[0]), dtype=torch.float32, device=x2.device)
    _eager_plan(plan_for(x2, weight, lora_A.shape[0], dropout_p, dy=dy2, plain=True),
                _backward_operands(dy2, x2, weight, lora_A, lora_B, xa2, needs, _seed_kind(seed, dropout_p)),
                lambda triton: backward_triton(dy2, x2, weight, lora_A, lora_B, xa2, scaling, dropout_p, seed, *needs,
                                               _plan=triton))


#: The ``CUBLAS_WORKSPACE_CONFIG`` values with which torch lets cuBLAS run
#: under ``torch.use_deterministic_algorithms(True)``.
_DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def cublas_deterministic() -> bool:
    """Whether cuBLAS may run here as far as determinism goes: unless torch's
    deterministic algorithms are on without a deterministic cuBLAS workspace
    (``CUBLAS_WORKSPACE_CONFIG``), where torch refuses every cuBLAS product.
    The Triton plan, deterministic by construction, runs there instead of
    the eager calls' ``cublas``."""
    return (not torch.are_deterministic_algorithms_enabled()
            or os.environ.get("CUBLAS_WORKSPACE_CONFIG") in _DETERMINISTIC_CUBLAS)


@_on_the_operands_device
def backward_triton(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
                    scaling: float, dropout_p: float, seed: int | Tensor,
                    need_x: bool, need_weight: bool, need_bias: bool, need_A: bool, need_B: bool,
                    strategy: str = "", row_scale: Tensor | None = None, adapter_ids: Tensor | None = None,
                    rank_ids: Tensor | None = None, rank_scaling: Tensor | None = None,
                    weight_scale: Tensor | None = None, weight_code: Tensor | None = None,
                    adapter_p: Tensor | None = None, _plan: dispatch.Plan | None = None):
    """``(dx, dW, db, dA, dB)`` of the math above; None where not needed.
    ``strategy``: the one the forward was forced to run (``""``: none), so
    that the backward follows it whatever thread autograd runs it on.
    ``row_scale``, ``adapter_ids``, ``rank_ids``, ``rank_scaling``: the
    forward's (``xa`` holds their ``w`` already); ``weight_scale`` and
    ``weight_code``: an int8 or 4-bit weight's (dx's GEMM dequantises its
    tiles; no dW: a quantized base is frozen); ``adapter_p``: the
    forward's."""
    k_ = _triton.get()
    n, k = base_shape(weight)
    r = lora_A.shape[0]
    x2, dy2, xa2 = _flatten(x, k), _flatten(dy, n), _flatten(xa, r)
    m = x2.shape[0]
    plan = _plan
    if plan is None:
        plain = row_scale is None and adapter_ids is None and adapter_p is None
        needs = (need_x, need_weight, need_bias, need_A, need_B)
        plan = _eager_plan(plan_for(x2, weight, r, dropout_p, strategy, weight_scale, dy=dy2, plain=plain),
                           _backward_operands(dy2, x2, weight, lora_A, lora_B, xa2, needs,
                                              _seed_kind(seed, dropout_p)),
                           lambda triton: backward_triton(
                               dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, *needs, _plan=triton))
    if plan.strategy == "cublas":
        dx2, d_w, d_bias, d_a, d_b = backward_cublas(dy2, x2, weight, lora_A, lora_B, xa2, scaling, need_x,
                                                     need_weight, need_bias, need_A, need_B, dropout_p, seed)
        return dx2.view(x.shape) if dx2 is not None else None, d_w, d_bias, d_a, d_b
    if need_x:  # (dx's GEMM reads the base; dW reads none: a quantized base is frozen)
        weight, weight_scale, code = _base_operands(k_, plan, weight, weight_scale, x.dtype, weight_code)
    w = _row_vector(row_scale, m)
    adapters = _adapter_columns(adapter_ids, rank_ids, rank_scaling, m)
    rows_p, inv_keep = _dropout_rows(adapters, adapter_p, dropout_p)
    # g = g_scale · (what the variable g holds): the dy pass scales it, the dx GEMM's K loop does not.
    g_in_dx = need_x and plan.dx_in_loop
    need_g_pass = (need_x or need_A) and not g_in_dx
    g_scale = scaling if g_in_dx else 1.0

    g = d_b = d_bias = None
    if need_g_pass or need_B or need_bias:
        # The dy pass: g = s·w⊙dy·B (unless the dx GEMM computes it), dB = s·dyᵀ·xa, db = Σ dy, one read of dy.
        g, d_b, d_bias = k_.skinny_pass(
            dy2, shrink=lora_B if need_g_pass else None, sh_scale=scaling, row_scale=w if need_g_pass else None,
            adapters=adapters if need_g_pass else None,
            tn_left=xa2 if need_B else None, tn_scale=scaling, tn_transposed=True, tn_dtype=lora_B.dtype,
            colsum=need_bias, colsum_dtype=x.dtype,
            config=plan.skinny, target_programs=plan.skinny_programs, input_precision=plan.input_precision)
    dx = d_a = d_w = None
    if need_x:
        a, b = (dy2[:, :0], weight[:0]) if plan.cublas_base else (dy2, weight)
        # dx = dy·W + (g·A)⊙mask/(1-p): the forward GEMM with (x, Wᵀ, Aᵀ, Bᵀ) -> (dy, W, B, A), its
        # low-rank left factor g read from the dy pass, or (g_in_dx) accumulated in the K loop as dy·B.
        low_rank = dict(shrink=lora_B, v=lora_A, lr_scale=scaling * inv_keep, row_scale=w,
                        adapters=adapters) if g_in_dx else dict(u=g, v=lora_A, lr_scale=inv_keep)

        def launch_dx(config):
            return k_.lora_gemm(a, b, **low_rank, dropout_p=dropout_p, seed=seed, dropout_rows=rows_p,
                                b_scale=weight_scale,
                                b_scale_dim=0, b_code=code, config=config, out_dtype=x.dtype,
                                input_precision=plan.input_precision, tma=plan.tma, tma_device=plan.tma_device,
                                persistent=plan.persistent, num_sms=plan.num_sms)

        dx2, dy_b = launch_dx(dispatch.gemm_config_for(
            "dx", plan.dx_gemm, launch_dx, m=m, n=k, k=a.shape[1], r=r, dtype=x.dtype, shrink_in_loop=g_in_dx,
            epilogue_mask=dropout_p > 0.0, device=x.device, persistent=plan.persistent,
            **_quantized_b(weight, weight_scale)))
        if g_in_dx:
            g = dy_b
        if plan.cublas_base:
            dx2.addmm_(dy2, weight)
        dx = dx2.view(x.shape)
    if need_A:
        _, d_a, _ = k_.skinny_pass(x2, tn_left=g, tn_scale=g_scale * inv_keep, dropout_p=dropout_p, seed=seed,
                                   dropout_rows=rows_p, tn_dtype=lora_A.dtype, config=plan.skinny,
                                   target_programs=plan.skinny_programs, input_precision=plan.input_precision)
    if need_weight:
        if plan.cublas_base:
            d_w = torch.mm(dy2.t(), x2)
        else:
            def launch_dw(config):
                return k_.lora_gemm(dy2.t(), x2, config=config, out_dtype=weight.dtype,
                                    input_precision=plan.input_precision, tma=plan.tma, tma_device=plan.tma_device,
                                    persistent=plan.persistent, num_sms=plan.num_sms)

            d_w, _ = launch_dw(dispatch.gemm_config_for(
                "dw", plan.dw_gemm, launch_dw, m=n, n=k, k=m, r=1, dtype=x.dtype, shrink_in_loop=False,
                epilogue_mask=False, device=x.device, persistent=plan.persistent))
    return dx, d_w, d_bias, d_a, d_b


# ----------------------------------------------------------------------------
# PyTorch ops (torch.library) and their autograd
# ----------------------------------------------------------------------------

# (private torch hooks, read once; where one is missing every call takes the ops)
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
_profiling = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", None)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
#: The types :func:`direct_call` takes as plain tensors.
_PLAIN = (Tensor, torch.nn.Parameter)


def direct_call(*tensors) -> bool:
    """Whether the autograd Function may run the Triton passes itself instead
    of through the registered ops. It may in plain eager mode, where the ops'
    dispatcher would only cost host time (about 15 µs a forward and 25 µs a
    backward, a sixth of the host's time per step at small M): not while
    torch.compile traces, nor under a dispatch mode (fake tensors,
    FlopCounterMode, selective activation checkpointing...), a tensor subclass
    (DTensor, FakeTensor...), a functorch transform or the profiler (whose
    trace then labels the ops). Either way the same functions run.
    ``nn.Parameter`` counts as plain: a layer's weights are Parameters, and one
    of a plain tensor has exactly that type and no dispatch or function
    override of its own (a Parameter of a subclass, such as FSDP2's sharded
    DTensor, has the subclass's type)."""
    if _dispatch_modes is None or _profiling is None or _functorch_active is None:
        return False
    if torch.compiler.is_compiling() or _dispatch_modes() or _profiling() or _functorch_active():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def _kernel_seed(seed: Tensor):
    """The kernels' seed from the ops' ``seed`` tensor: a 0-d int64 CPU tensor
    holds the value (passed to the kernels as an argument); a 0-d int32 tensor
    on x's device (drawn there, or a traced call's int seed), or an int64 one
    on a GPU (a traced call's int seed of 2**31 or more), is read by the
    kernels (so that a captured CUDA graph draws a new seed at each replay;
    see ``kernels.common.load_seed``)."""
    return seed if seed.dtype == torch.int32 or seed.device.type != "cpu" else int(seed)


@torch.library.custom_op("fused_lora::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                    scaling: float, dropout_p: float, seed: Tensor, strategy: str = "",
                    row_scale: Tensor | None = None, adapter_ids: Tensor | None = None,
                    rank_ids: Tensor | None = None, rank_scaling: Tensor | None = None,
                    weight_scale: Tensor | None = None, weight_code: Tensor | None = None,
                    adapter_p: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(y, xa)``: y (..., N) in x's dtype; xa = w ⊙ drop(x)·Aᵀ (..., r) in fp32
    (``w`` from ``row_scale``, of x's leading shape, and the adapters'
    ``adapter_ids``, of x's leading shape, with ``rank_ids`` and
    ``rank_scaling`` (r,); each None or given). ``weight_scale``: an int8
    weight's (N,), a 4-bit one's (N, K/group), or None; ``weight_code``: a
    4-bit weight's code book (16,), None for NF4; ``adapter_p``: the
    adapters' own dropout probabilities (n,) fp32, or None.
    ``seed``: a 0-d int64 CPU tensor holding the seed, or a 0-d int32 tensor
    on x's device that the kernels read (a tensor either way, so that drawing
    it stays inside a compiled graph). ``strategy``: a forced one, ``""`` when none
    (then an enclosing :func:`fused_lora.dispatch.force_strategy` still
    applies); the backward follows it."""
    return forward_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p, _kernel_seed(seed), strategy,
                          row_scale, adapter_ids, rank_ids, rank_scaling, weight_scale, weight_code, adapter_p)


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, strategy="", row_scale=None, adapter_ids=None,
      rank_ids=None, rank_scaling=None, weight_scale=None, weight_code=None, adapter_p=None):
    return (x.new_empty((*x.shape[:-1], weight.shape[0])),
            x.new_empty((*x.shape[:-1], lora_A.shape[0]), dtype=torch.float32))


@torch.library.custom_op("fused_lora::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
                    scaling: float, dropout_p: float, seed: Tensor, need_x: bool, need_weight: bool,
                    need_bias: bool, need_A: bool, need_B: bool, strategy: str = "",
                    row_scale: Tensor | None = None, adapter_ids: Tensor | None = None,
                    rank_ids: Tensor | None = None, rank_scaling: Tensor | None = None,
                    weight_scale: Tensor | None = None, weight_code: Tensor | None = None,
                    adapter_p: Tensor | None = None) -> list[Tensor]:
    """``[dx, dW, db, dA, dB]``; a gradient nobody needs is an empty tensor.
    ``strategy``: the forward's forced strategy, ``""`` when none;
    ``row_scale``, ``adapter_ids``, ``rank_ids``, ``rank_scaling``, ``weight_scale``, ``weight_code``,
    ``adapter_p``: the forward's."""
    grads = backward_triton(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, _kernel_seed(seed),
                            need_x, need_weight, need_bias, need_A, need_B, strategy, row_scale, adapter_ids,
                            rank_ids, rank_scaling, weight_scale, weight_code, adapter_p)
    return [g if g is not None else x.new_empty(0) for g in grads]


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_x, need_weight, need_bias, need_A, need_B,
      strategy="", row_scale=None, adapter_ids=None, rank_ids=None, rank_scaling=None, weight_scale=None,
      weight_code=None, adapter_p=None):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape)
    needs = (need_x, need_weight, need_bias, need_A, need_B)
    return [x.new_empty(s) if need else x.new_empty(0) for s, need in zip(shapes, needs)]


@_on_the_operands_device
def _dora_norm_triton(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                      weight_scale: Tensor | None = None, weight_code: Tensor | None = None) -> Tensor:
    return _triton.get().dora_norm(weight, lora_A, lora_B, scaling, weight_scale,
                                   _kernel_code(weight, weight_code) if weight_scale is not None else None)


@torch.library.custom_op("fused_lora::dora_norm", mutates_args=())
def dora_norm_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                 weight_scale: Tensor | None = None, weight_code: Tensor | None = None) -> Tensor:
    """``ν = ‖W + s·B A‖`` per output feature, fp32 (N,): the Triton kernel
    (one read of W; :mod:`fused_lora.kernels.dora`), A and B in W's dtype
    (``weight_scale``, ``weight_code``: W is int8 or 4-bit, Ŵ in A's dtype)."""
    return _dora_norm_triton(weight, lora_A, lora_B, scaling, weight_scale, weight_code)


@dora_norm_op.register_fake
def _(weight, lora_A, lora_B, scaling, weight_scale=None, weight_code=None):
    return lora_A.new_empty(weight.shape[:1], dtype=torch.float32)


@_on_the_operands_device
def _dora_norms_triton(weight: Tensor, lora_A: Tensor, lora_B: Tensor, bounds: Tensor, scales: Tensor,
                       max_rank: int, weight_scale: Tensor | None = None,
                       weight_code: Tensor | None = None) -> Tensor:
    return _triton.get().dora_norms(weight, lora_A, lora_B, bounds, scales, max_rank, weight_scale,
                                    _kernel_code(weight, weight_code) if weight_scale is not None else None)


@torch.library.custom_op("fused_lora::dora_norms", mutates_args=())
def dora_norms_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, bounds: Tensor, scales: Tensor, max_rank: int,
                  weight_scale: Tensor | None = None, weight_code: Tensor | None = None) -> Tensor:
    """Several adapters' ``ν_a = ‖W + s_a·B_a A_a‖``, fp32 (n, N), in one
    read of W (:func:`fused_lora.kernels.dora.dora_norms`): A (R, K) and B
    (N, R) the adapters side by side, adapter a's rank columns
    ``[bounds[2a], bounds[2a + 1])`` (int32, (2n,)), its scale ``scales[a]``
    (fp32, (n,)), none of rank above ``max_rank``."""
    return _dora_norms_triton(weight, lora_A, lora_B, bounds, scales, max_rank, weight_scale, weight_code)


@dora_norms_op.register_fake
def _(weight, lora_A, lora_B, bounds, scales, max_rank, weight_scale=None, weight_code=None):
    return lora_A.new_empty((scales.shape[0], weight.shape[0]), dtype=torch.float32)


def _save_for_backward(ctx, x, weight, bias, lora_A, lora_B, xa, scaling, dropout_p, seed, strategy, row_scale,
                       adapters, weight_scale, weight_code=None, adapter_p=None):
    # (no seed without dropout: a compiled forward would hand its backward the CPU constant it ran with, which
    # CUDA graphs refuse, expecting whatever a forward graph hands on in their memory pool)
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, row_scale, weight_scale, weight_code, adapter_p,
                          seed if dropout_p > 0.0 else None, *adapters)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p
    ctx.has_bias = bias is not None
    # The forward's forced strategy holds for its backward too, which autograd
    # may run later, outside the force, on another thread.
    ctx.strategy = strategy


def _gradients(ctx, dy):
    """(dx, dW, db, dA, dB) for ctx.needs_input_grad's first five inputs,
    which are (x, weight, bias, lora_A, lora_B) in both entry points."""
    x, weight, lora_A, lora_B, xa, row_scale, weight_scale, weight_code, adapter_p, seed, *adapters = \
        ctx.saved_tensors
    if seed is None:  # no dropout (_save_for_backward): any seed, made in the graph where one is traced
        seed = _NO_DROPOUT_SEED if direct_call(x) else torch.zeros((), dtype=torch.int32, device=x.device)
    need = list(ctx.needs_input_grad[:5])
    need[2] = need[2] and ctx.has_bias
    if not any(need):
        return (None,) * 5
    if torch.is_grad_enabled():  # create_graph=True: gradients to differentiate again
        return _differentiable_gradients(dy, x, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed, need,
                                         row_scale, adapters, weight_scale, weight_code, adapter_p)
    adapters = tuple(adapters) or (None,) * 3
    if direct_call(dy, x, weight, lora_A, lora_B, xa, row_scale, weight_scale, weight_code, adapter_p, *adapters):
        return backward_triton(dy, x, weight, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p, _kernel_seed(seed), *need,
                               ctx.strategy, row_scale, *adapters, weight_scale, weight_code, adapter_p)
    grads = torch.ops.fused_lora.lora_linear_bwd(dy, x, weight, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p,
                                                 seed, *need, ctx.strategy, row_scale, *adapters, weight_scale,
                                                 weight_code, adapter_p)
    return tuple(g if n else None for g, n in zip(grads, need))


def _differentiable_gradients(dy, x, weight, lora_A, lora_B, scaling, dropout_p, seed, need, row_scale, adapters,
                              weight_scale, weight_code=None, adapter_p=None):
    """The gradients for ``create_graph=True`` (a gradient penalty,
    meta-learning), which autograd can differentiate again with respect to
    dy and every input: autograd's own, through the reference (the math above
    in PyTorch ops, the mask regenerated from the seed, on the device a drawn
    one is on). The kernels' gradients cannot be differentiated."""
    inputs = (x, weight, None, lora_A, lora_B)  # (the bias's gradient does not need the recomputation)
    wanted = [i for i in (0, 1, 3, 4) if need[i]]
    out = [None] * 5
    if wanted:
        y = lora_linear_checked(x, weight, lora_A, lora_B, None, scaling, dropout_p, seed, row_scale,
                                tuple(adapters) or None, weight_scale, weight_code, adapter_p)
        grads = torch.autograd.grad(y, [inputs[i] for i in wanted], dy, create_graph=True)
        for i, g in zip(wanted, grads):
            out[i] = g
    if need[2]:
        out[2] = _flatten(dy, dy.shape[-1]).sum(0)
    return tuple(out)


def _op_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, *rest = inputs
    strategy, row_scale, *adapters, weight_scale, weight_code, adapter_p = \
        (*rest, "", None, None, None, None, None, None, None)[:8]
    _y, xa = output
    ctx.mark_non_differentiable(xa)
    # Called without a strategy, the op ran under the force of the moment;
    # while torch.compile traces, that moment is later: the backward op will
    # read the force of its own moment.
    forced = strategy or ("" if torch.compiler.is_compiling() else dispatch.forced_strategy() or "")
    _save_for_backward(ctx, x, weight, bias, lora_A, lora_B, xa, scaling, dropout_p, seed, forced, row_scale,
                       adapters if adapters[0] is not None else (), weight_scale, weight_code, adapter_p)


def _op_backward(ctx, dy, _dxa):
    # (scaling, dropout_p, seed, strategy, row_scale, adapter_ids, rank_ids, rank_scaling, weight_scale,
    # weight_code, adapter_p: none)
    return (*_gradients(ctx, dy), *(None,) * 11)


torch.library.register_autograd("fused_lora::lora_linear_fwd", _op_backward, setup_context=_op_setup_context)


class _LoRALinearFunction(torch.autograd.Function):
    """:class:`LoRALinearFunction` without its checks: what :func:`lora_linear`
    and :func:`multi_lora_linear` apply, having checked the arguments."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, row_scale=None, adapter_ids=None,
                rank_ids=None, rank_scaling=None, weight_scale=None, weight_code=None, adapter_p=None):
        # (read here, where torch.compile traces it and guards on it)
        strategy = dispatch.forced_strategy() or ""
        adapters = (adapter_ids, rank_ids, rank_scaling)
        if direct_call(x, weight, bias, lora_A, lora_B, row_scale, weight_scale, weight_code, adapter_p, *adapters):
            y, xa = forward_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p, _kernel_seed(seed), strategy,
                                   row_scale, *adapters, weight_scale, weight_code, adapter_p)
        else:
            y, xa = torch.ops.fused_lora.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed,
                                                         strategy, row_scale, *adapters, weight_scale, weight_code,
                                                         adapter_p)
        _save_for_backward(ctx, x, weight, bias, lora_A, lora_B, xa, scaling, dropout_p, seed, strategy, row_scale,
                           adapters if adapter_ids is not None else (), weight_scale, weight_code, adapter_p)
        return y

    @staticmethod
    def backward(ctx, dy):
        # (scaling, dropout_p, seed, row_scale, adapter_ids, rank_ids, rank_scaling, weight_scale, weight_code,
        # adapter_p: none)
        return (*_gradients(ctx, dy), *(None,) * 10)


class LoRALinearFunction(_LoRALinearFunction):
    """``y = x Wᵀ + b + s·(w ⊙ drop(x) Aᵀ) Bᵀ`` with the Triton kernels.

    ``LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling,
    dropout_p, seed[, row_scale[, adapter_ids, rank_ids, rank_scaling[,
    weight_scale[, weight_code[, adapter_p]]]]])``: the tensors as :func:`lora_linear`'s, one dtype and
    device (an int8 or 4-bit ``weight`` with its ``weight_scale``, and a
    4-bit one's ``weight_code``, None for NF4); ``seed`` a
    0-d int64 CPU tensor holding the seed, or a 0-d int32 tensor on x's
    device that the kernels read (:func:`fused_lora.dropout.draw_seed_tensor`);
    ``row_scale`` (x's leading shape, floating point) or the adapters'
    ``adapter_ids`` (int32, x's leading shape), ``rank_ids`` (int32, (r,))
    and ``rank_scaling`` (float32, (r,)), the factors of ``w`` of the math
    (not differentiated; their values are not read: an id that no rank
    column has runs the base alone, one below -1 gives NaN); with them,
    ``adapter_p`` (float32, (n,), contiguous, values in [0, 1) not read
    back): each adapter's own dropout probability, row m's mask drawn with
    ``adapter_p[adapter_ids[m]]`` (``dropout_p`` then says only whether
    masks are drawn: their largest), its ``1 / (1 - p)`` the caller's to
    fold into ``rank_scaling``; every id then below n or negative, as the
    kernels read ``adapter_p`` at it unchecked (:func:`multi_lora_linear`
    checks its ids, or, where it cannot without a sync, makes those out of
    range -2). Saves only x, the
    weights and the tiny fp32 ``xa`` (M, r); computes only the gradients that
    ``needs_input_grad`` asks for (twice differentiable: with
    ``create_graph=True`` in PyTorch ops). Runs the kernels whatever the
    device (:func:`lora_linear` picks the backend, applies autocast, draws
    the seed and adapts the arguments). Arguments are checked first:
    ``TypeError``/``ValueError`` naming them and their shapes.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, row_scale=None, adapter_ids=None,
                rank_ids=None, rank_scaling=None, weight_scale=None, weight_code=None, adapter_p=None):
        _check_function_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, row_scale, adapter_ids,
                             rank_ids, rank_scaling, weight_scale, weight_code, adapter_p)
        # (here grad mode is off: what autograd asks)
        for name, i in (("row_scale", 8), ("rank_scaling", 11), ("weight_scale", 12), ("weight_code", 13),
                        ("adapter_p", 14)):
            if i < len(ctx.needs_input_grad) and ctx.needs_input_grad[i]:  # (the arguments passed)
                raise ValueError(f"{name} requires grad, but no gradient flows to it: pass {name}.detach()")
        return _LoRALinearFunction.forward(ctx, x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p),
                                           seed, row_scale, adapter_ids, rank_ids, rank_scaling, weight_scale,
                                           weight_code, adapter_p)


def _check_function_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, row_scale, adapter_ids, rank_ids,
                         rank_scaling, weight_scale=None, weight_code=None, adapter_p=None) -> None:
    """:class:`LoRALinearFunction`'s arguments, as it takes them."""
    check_lora_args(x, weight, lora_A, lora_B, bias, scaling, dropout_p, None, weight_scale=weight_scale)
    check_weight_scale(x, weight, weight_scale)  # (its requires_grad: the Function's to refuse)
    check_weight_code(x, weight, weight_code)
    reason = _triton.why_not(x.device, x.dtype)
    if reason:
        raise ValueError(f"LoRALinearFunction runs the Triton kernels, which cannot run here: {reason} (lora_linear "
                         "runs the torch backend there)")
    if not (isinstance(seed, Tensor) and seed.dim() == 0
            and ((seed.dtype == torch.int64 and seed.device.type == "cpu")
                 or (seed.dtype == torch.int32 and seed.device == x.device))):
        got = (f"a {seed.dtype} tensor of shape {tuple(seed.shape)} on {seed.device}" if isinstance(seed, Tensor)
               else type(seed).__name__)
        raise TypeError(f"seed must be a 0-d int64 CPU tensor holding the seed, or a 0-d int32 tensor on x's device "
                        f"({x.device}) that the kernels read; got {got}")
    if seed.dtype == torch.int64:
        check_seed(int(seed))
    check_row_scale(x, row_scale)
    adapters = {"adapter_ids": adapter_ids, "rank_ids": rank_ids, "rank_scaling": rank_scaling}
    if all(t is None for t in adapters.values()):
        if adapter_p is not None:
            raise ValueError("adapter_p holds the adapters' dropout probabilities: it comes with adapter_ids, "
                             "rank_ids and rank_scaling")
        return
    missing = [name for name, t in adapters.items() if t is None]
    if missing:
        raise ValueError(f"adapter_ids, rank_ids and rank_scaling come together; {', '.join(missing)} missing")
    if row_scale is not None:
        raise ValueError("pass row_scale or the adapters' tensors (adapter_ids, rank_ids, rank_scaling), not both")
    r, lead = lora_A.shape[0], tuple(x.shape[:-1])
    for (name, t), dtype, shape in zip(adapters.items(), (torch.int32, torch.int32, torch.float32),
                                       (lead, (r,), (r,))):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype or tuple(t.shape) != shape or t.device != x.device or (
                name != "adapter_ids" and not t.is_contiguous()):
            contiguous = "" if name == "adapter_ids" else ", contiguous,"
            raise ValueError(f"{name} must be a {dtype} tensor of shape {shape}{contiguous} on x's device "
                             f"({x.device}) for x {tuple(x.shape)} and lora_A {tuple(lora_A.shape)}; got a "
                             f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}")
    if adapter_p is not None:
        if not isinstance(adapter_p, Tensor):
            raise TypeError(f"adapter_p must be a torch.Tensor, got {type(adapter_p).__name__}")
        if adapter_p.dtype != torch.float32 or adapter_p.dim() != 1 or adapter_p.device != x.device \
                or not adapter_p.is_contiguous():
            raise ValueError(f"adapter_p must be a contiguous float32 tensor of one dropout probability an adapter, "
                             f"(n,), on x's device ({x.device}); got a {adapter_p.dtype} tensor of shape "
                             f"{tuple(adapter_p.shape)} on {adapter_p.device}")


# ----------------------------------------------------------------------------
# The functional entry point
# ----------------------------------------------------------------------------

def _autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for a device type
    autocast does not know (``meta``...), where torch's own query raises.
    (While torch.compile traces, the query alone: the availability check is
    not traceable on every torch (2.11 breaks the graph there), and the
    devices it compiles for have autocast.)"""
    if not torch.compiler.is_compiling() and not _autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


@functools.lru_cache(maxsize=None)
def _autocast_available(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type)


def _autocast(device_type: str, *tensors):
    """What autocast does to ``F.linear``'s inputs: float16/bfloat16/float32
    tensors are cast to the autocast dtype (differentiably: gradients reach the
    originals in their own dtype); float64 is left alone."""
    dtype = torch.get_autocast_dtype(device_type)
    eligible = (torch.float16, torch.bfloat16, torch.float32)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in eligible and t.dtype != dtype else t
                 for t in tensors)


def resolve_backend(backend: str, x: Tensor) -> str:
    """``"triton"`` or ``"torch"`` for a call on ``x``; raises ValueError when
    ``"triton"`` is asked for where it cannot run."""
    check_backend(backend)
    if backend == "torch":
        return "torch"
    reason = _triton.why_not(x.device, x.dtype)
    if not reason and _functorch_active is not None and _functorch_active():
        reason = ("a torch.func transform (vmap, grad, jacrev...) is active, and the kernels have no batching "
                  "rule; the torch backend runs under it")
    if backend == "triton" and reason:
        raise ValueError(f'backend="triton" cannot run here: {reason}')
    return "torch" if reason else "triton"


def lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    bias: Tensor | None = None,
    *,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    seed: int | None = None,
    row_scale: Tensor | None = None,
    weight_scale: Tensor | None = None,
    weight_code: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """``y = x Wᵀ + b + scaling · (w ⊙ drop(x) Aᵀ) Bᵀ`` (math in :mod:`fused_lora.ops`).

    Args:
        x: (..., in_features), any strides, fp16/bf16/fp32 (fp64 runs on the
            torch backend).
        weight: (out_features, in_features), the frozen base weight: in
            x's dtype, or int8 with ``weight_scale`` (a quantized base), or
            uint8 (out_features, in_features / 2) with ``weight_scale``: a
            packed NF4 base (QLoRA's; :mod:`fused_lora.quant`).
        lora_A: (r, in_features). lora_B: (out_features, r).
        bias: (out_features,) or None.
        scaling: the LoRA scale s, a runtime value (changing it compiles nothing).
        dropout_p: dropout probability on the LoRA path, in [0, 1). Applied
            whenever > 0 (use :class:`fused_lora.LoRALinear` for train/eval).
        seed: Philox seed of the dropout mask; None draws one from the
            default generator of x's device, on the device (so
            ``torch.manual_seed`` reproduces a run, and a captured CUDA graph
            draws a new mask at each replay). The mask is
            :func:`fused_lora.dropout_mask` of (seed, (M, K), p).
        row_scale: ``w``, a scale of each row's low-rank term: a
            floating-point tensor of x's leading shape ``x.shape[:-1]`` (one
            value per token) on x's device, or None (1 everywhere). 0 on a
            row gives that row the base alone, in the same launches as the
            others (a batch mixing the adapter and the bare base). Not
            differentiated (a tensor requiring grad is refused).
        weight_scale: an int8 ``weight``'s scale, (out_features,), floating
            point, on x's device: the base is then ``Ŵ = round(weight ·
            weight_scale[:, None])`` in x's dtype
            (:func:`fused_lora.dequantize_int8`; :func:`fused_lora.quantize_int8`
            makes both), dequantised tile by tile inside the GEMMs; or a
            packed NF4 ``weight``'s absmax, (out_features, in_features /
            group) floating point, the group a power of two >= 2: the base is
            then ``round(NF4_CODE[index] · absmax)`` per element in x's dtype
            (:func:`fused_lora.dequantize_nf4`; :func:`fused_lora.quantize_nf4`
            makes both; bitsandbytes' ``dequantize_4bit`` bit for bit). None
            (the default) for a floating-point weight. Not differentiated.
        weight_code: a packed 4-bit ``weight``'s code book, the 16 values of
            its indices, a floating-point (16,) tensor on x's device: the
            base is then ``round(weight_code[index] · absmax)``
            (:func:`fused_lora.quant.dequantize_4bit`); bitsandbytes' FP4 is
            :data:`fused_lora.quant.FP4_CODE` (:func:`fused_lora.quantize_fp4`).
            None (the default): NF4's. Not differentiated.
        backend: ``"triton"`` (CUDA tensors, or CPU tensors under
            ``TRITON_INTERPRET=1``), ``"torch"`` (the reference), or ``"auto"``
            (Triton where it can run, else torch: also under torch.func
            transforms such as vmap and grad, which the kernels do not support).

    Under ``torch.autocast`` the tensors are first cast to the autocast dtype,
    as for ``F.linear``.

    Returns:
        (..., out_features) in x's dtype. Gradients flow to x, lora_A, lora_B,
        and to weight and bias when they require grad.
    """
    if isinstance(x, Tensor) and _autocast_enabled(x.device.type):
        x, weight, lora_A, lora_B, bias = _autocast(x.device.type, x, weight, lora_A, lora_B, bias)
    scaling, dropout_p, seed = check_lora_args(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed,
                                               weight_scale=weight_scale)
    weight_scale = check_weight_scale(x, weight, weight_scale)
    weight_code = check_weight_code(x, weight, weight_code)
    row_scale = check_row_scale(x, row_scale)
    return _lora_linear(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, row_scale, (), backend,
                        weight_scale, weight_code)


#: The seed tensor of a call without dropout (or with seed 0), made once: only
#: read, never written (``torch.tensor`` costs about 3 µs of host time a call).
_NO_DROPOUT_SEED = torch.zeros((), dtype=torch.int64, device="cpu")


def _lora_linear(x, weight, lora_A, lora_B, bias, scaling: float, dropout_p: float, seed, row_scale, adapters,
                 backend: str, weight_scale=None, weight_code=None, adapter_p=None) -> Tensor:
    """:func:`lora_linear` on checked arguments; ``adapters``: ``()``, or
    ``(adapter_ids, rank_ids, rank_scaling)`` (:func:`multi_lora_linear`),
    with ``adapter_p``, their own dropout probabilities, or None."""
    if resolve_backend(backend, x) == "torch":
        if dropout_p > 0.0 and seed is None:
            seed = draw_seed_tensor(x.device)
        return lora_linear_checked(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, row_scale,
                                   adapters or None, weight_scale, weight_code, adapter_p)
    if dropout_p == 0.0:
        seed = 0
    elif seed is None:
        # Drawn on x's device by its generator, and read there by the kernels:
        # inside a captured CUDA graph each replay then draws a new seed (a
        # value drawn on the host would be frozen into the graph: one mask for
        # every replay). torch.manual_seed seeds it; checkpointing restores it.
        seed = draw_seed_tensor(x.device)
    differentiated = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B))
    if row_scale is None and not adapters and weight_scale is None:
        y = _eager_cublas(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, differentiated)
        if y is not None:
            return y
    adapters = adapters or (None,) * 3
    if not differentiated and direct_call(x, weight, bias, lora_A, lora_B, row_scale, weight_scale, weight_code,
                                          adapter_p, *adapters):
        # Nothing to differentiate (inference, torch.no_grad): the forward
        # alone, without the autograd Function's host time
        return forward_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed,
                              dispatch.forced_strategy() or "", row_scale, *adapters, weight_scale, weight_code,
                              adapter_p)[0]
    # (on the CPU whatever the default device: a value the kernels take as an argument, never read back
    # from a GPU, which would sync the host and break a CUDA graph's capture. Where the call is traced
    # (torch.compile), the seed is made on x's device instead, int32 as a drawn one is where it fits, else
    # int64: a mask's seed goes on to the backward, which CUDA graphs expect in their pool; and under
    # torch.compile without dropout too, where a CPU tensor, even 0-d, became an input of the compiled graph's
    # CUDA-graph partition, which they refuse ("not allocated in pool": the fifth GPU run, whose layer without
    # dropout still handed its op the CPU constant). Not in eager calls that are not direct (the profiler,
    # a dispatch mode): there it would be a fill launch a call for a seed no kernel reads)
    if isinstance(seed, Tensor):
        seed_t = seed
    elif not direct_call(x) and (dropout_p > 0.0 or torch.compiler.is_compiling()):
        seed_t = torch.full((), seed, dtype=torch.int32 if seed < 2**31 else torch.int64, device=x.device)
    else:
        seed_t = _NO_DROPOUT_SEED if seed == 0 else torch.tensor(seed, dtype=torch.int64, device="cpu")
    return _LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_t, row_scale, *adapters,
                                     weight_scale, weight_code, adapter_p)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    bias: Tensor | None = None,
    *,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    seed: int | None = None,
    weight_scale: Tensor | None = None,
    weight_code: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``):
    ``y = x Wᵀ + b + (γ - 1) ⊙ drop(x) Wᵀ + γ ⊙ s·drop(x) Aᵀ Bᵀ`` with
    ``γ = magnitude / ‖W + s·B A‖``, the norm per output feature and
    detached (math in :mod:`fused_lora.ops`).

    The base GEMM and the low-rank term run as :func:`lora_linear` (fused,
    forward and backward); the norm in one read of W (a Triton kernel,
    :mod:`fused_lora.kernels.dora`: ``s·B A`` made tile by tile in fp32,
    never stored); ``γ ⊙ z`` and what is added to it are one elementwise
    pass over the output. (The torch backend is the reference, which makes
    ``W + s·B A`` whole in x's dtype, as PEFT.) Not fused yet: that pass (the column
    scale belongs in the GEMM's epilogue) and, with dropout, the mask, drawn
    once in PyTorch, and the correction, a second base GEMM on ``x - drop(x)``
    (the mask and drop(x) are kept for the backward, as PEFT keeps them; on
    a quantized base the fused GEMMs', reading W as it is: no Ŵ of (N, K) is
    kept for the backward, where ``F.linear`` on Ŵ, PEFT's way, keeps one
    a layer).

    Args:
        x, weight, lora_A, lora_B, bias, scaling, dropout_p, backend: as
            :func:`lora_linear`'s.
        magnitude: (out_features,), DoRA's ``m`` (PEFT's
            ``lora_magnitude_vector``), in x's dtype, on its device.
        seed: with dropout, None draws the mask with torch's Bernoulli
            sampler from the default generator of x's device (as PEFT's
            ``nn.Dropout``: ``torch.manual_seed`` reproduces it); a seed makes
            it :func:`fused_lora.dropout_mask` of (seed, (M, K), p), as
            :func:`lora_linear`'s (its PyTorch ops are slow on a GPU at large
            M·K: for checks, not for training).
        weight_scale, weight_code: an int8 or 4-bit ``weight``'s, as :func:`lora_linear`'s (QDoRA:
            W is Ŵ throughout, the norm's read of it dequantising its tiles,
            and with dropout the correction's GEMMs too).

    Returns:
        (..., out_features) in x's dtype. Gradients flow to x, lora_A,
        lora_B and magnitude (none through the norm), and to weight and bias
        when they require grad.
    """
    if isinstance(x, Tensor) and _autocast_enabled(x.device.type):
        x, weight, lora_A, lora_B, bias, magnitude = _autocast(x.device.type, x, weight, lora_A, lora_B, bias,
                                                               magnitude)
    scaling, dropout_p, seed = check_lora_args(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed,
                                               weight_scale=weight_scale)
    weight_scale = check_weight_scale(x, weight, weight_scale)
    weight_code = check_weight_code(x, weight, weight_code)
    magnitude = check_magnitude(x, weight, magnitude)
    if resolve_backend(backend, x) == "torch":
        if weight_scale is not None:
            weight = dequantize_base(weight, weight_scale, x.dtype, weight_code)
        return dora_linear_checked(x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, seed)
    gamma = _dora_gamma(weight, lora_A, lora_B, magnitude, scaling, weight_scale, weight_code, x.dtype)
    # (γ ⊙ z plus what is added, one pass over the output: addcmul)
    if dropout_p == 0.0:
        z = _lora_linear(x, weight, lora_A, lora_B, None, scaling, 0.0, None, None, (), "triton", weight_scale,
                         weight_code)
        return z * gamma if bias is None else torch.addcmul(bias, z, gamma)
    # y = γ ⊙ (drop(x) Wᵀ + s·drop(x) Aᵀ Bᵀ) + (x - drop(x)) Wᵀ + b: the fused op on drop(x), without its
    # own dropout (the correction needs drop(x) itself)
    dropped = dora_dropped(x, dropout_p, seed)
    z = _lora_linear(dropped, weight, lora_A, lora_B, None, scaling, 0.0, None, None, (), "triton", weight_scale,
                     weight_code)
    return torch.addcmul(_dora_correction(x, dropped, weight, bias, weight_scale, weight_code), z, gamma)


def _dora_gamma(weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float,
                weight_scale: Tensor | None, weight_code: Tensor | None, dtype: torch.dtype) -> Tensor:
    """DoRA's ``γ = m / ‖W + s·B A‖`` (N,) in ``dtype``: the norm by the
    Triton kernel (one read of W), detached (DoRA §4.3, PEFT); differentiable in m."""
    with torch.no_grad():
        norm = (_dora_norm_triton if direct_call(weight, lora_A, lora_B, weight_scale, weight_code)
                else torch.ops.fused_lora.dora_norm)(weight.detach(), lora_A.detach(), lora_B.detach(), scaling,
                                                     weight_scale, weight_code)
    return (magnitude.to(torch.float32) / norm).to(dtype)


def _dora_correction(x: Tensor, dropped: Tensor, weight: Tensor, bias: Tensor | None,
                     weight_scale: Tensor | None, weight_code: Tensor | None) -> Tensor:
    """DoRA's ``(x - drop(x)) Wᵀ + b`` (with dropout)."""
    if weight_scale is None:
        return torch.nn.functional.linear(x - dropped, weight, bias)
    # The fused GEMMs read the quantized base as it is: no Ŵ of (N, K) kept for the backward, as F.linear
    # on Ŵ keeps one. (Their low-rank term a zero one of rank 1, not none: the kernels the compile report
    # checks, at r/BLOCK_N extra FLOPs, exactly 0 added; the zeros are not differentiated.)
    n, k = base_shape(weight)
    return _lora_linear(x - dropped, weight, x.new_zeros((1, k)), x.new_zeros((n, 1)), bias, 1.0, 0.0,
                        None, None, (), "triton", weight_scale, weight_code)


#: Elements of ``W + s·B A`` made at once by :func:`dora_norm` (fp32: 64 MiB).
DORA_NORM_CHUNK = 2**24


def dora_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
              chunk: int = DORA_NORM_CHUNK) -> Tensor:
    """``ν = ‖W + s·B A‖`` per output feature (fp32 (N,), fp64 for an fp64
    weight; no gradient): ``W + s·B A`` made in that dtype a block of rows
    at a time (at most ``chunk`` elements; PEFT makes it whole, in x's
    dtype, each step), each row's norm
    taken. (Not from ``‖W_n‖² + 2s·B_n·(W Aᵀ)_n + s²·B_n (A Aᵀ) B_nᵀ``,
    which reads W less but loses ν where W and s·B A nearly cancel: the
    error of those terms, relative to ν², grows as (‖W‖/ν)².) Under
    autocast too, whose fp16/bf16 casts would round it."""
    device_type = weight.device.type
    autocast = torch.autocast(device_type, enabled=False) if _autocast_enabled(device_type) \
        else contextlib.nullcontext()
    n, k = weight.shape
    rows = max(1, chunk // max(k, 1))
    with torch.no_grad(), autocast:
        acc = torch.promote_types(weight.dtype, torch.float32)
        a32 = lora_A.to(acc)
        norms = torch.empty(n, dtype=acc, device=weight.device)
        for start in range(0, n, rows):
            adapted = weight[start:start + rows].to(acc, copy=True)
            adapted.addmm_(lora_B[start:start + rows].to(acc), a32, alpha=scaling)
            norms[start:start + rows] = torch.linalg.vector_norm(adapted, dim=1)
        return norms


def multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Sequence[Tensor],
    lora_B: Sequence[Tensor],
    adapter_ids: Tensor,
    bias: Tensor | None = None,
    *,
    scaling: float | Sequence[float] = 1.0,
    dropout_p: float | Sequence[float] = 0.0,
    seed: int | None = None,
    weight_scale: Tensor | None = None,
    weight_code: Tensor | None = None,
    magnitude: Sequence[Tensor | None] | None = None,
    backend: str = "auto",
) -> Tensor:
    """Several adapters on one frozen base, each row of x through its own:
    ``y[m] = x[m] Wᵀ + b + s_i · (drop(x)[m] A_iᵀ) B_iᵀ`` with ``i =
    adapter_ids[m]``, or ``x[m] Wᵀ + b`` where ``adapter_ids[m]`` is -1 (math
    in :mod:`fused_lora.ops`: the adapters side by side in the rank). One set
    of fused launches for the whole batch, whatever its mix of adapters: for
    serving several adapters from one base, or training several at once
    (each adapter's gradients come from its own rows alone).

    Args:
        x: (..., in_features), as :func:`lora_linear`'s.
        weight: (out_features, in_features), the frozen base weight.
        lora_A: a sequence of n >= 1 tensors (r_i, in_features), the adapters'
            A, ranks free to differ, 0 included (an adapter that leaves this
            layer alone: its rows get the base). lora_B: n tensors
            (out_features, r_i).
        adapter_ids: an integer tensor on x's device: the adapter of each
            row, of x's leading shape ``x.shape[:-1]`` (a token each), or
            ``(x.shape[0],)`` for an x of 3 or more dims (a sample each);
            ``i`` in ``[0, n)`` runs adapter i, -1 the base alone. Other
            ids raise a ValueError (one host sync to check them), except
            while torch.compile traces or a CUDA graph captures, where
            nothing can be checked without a sync: their rows come out NaN.
        bias: (out_features,) or None.
        scaling: the adapters' scales s_i (``alpha_i / r_i``): a sequence of
            n, or one for all.
        dropout_p, seed: as :func:`lora_linear`'s, one mask for the batch
            (each row's adapter sees its row's mask). ``dropout_p`` may be a
            sequence of n, each adapter's own probability: row m's mask is
            drawn with its adapter's (the same random numbers, each row its
            own threshold: :func:`fused_lora.dropout_mask` with one
            probability a row), ``drop(x)[m] = x[m] ⊙ keep[m] / (1 - p_i)``.
        weight_scale, weight_code, backend: as :func:`lora_linear`'s (an
            int8 or 4-bit base: many adapters served from one quantized base).
        magnitude: None, or a sequence of n, each adapter's DoRA magnitude
            ``m_i`` (out_features,) in x's dtype (PEFT's
            ``lora_magnitude_vector``), or None for a plain LoRA adapter:
            the rows of a DoRA adapter get :func:`dora_linear`'s output of
            it, ``γ_i = m_i / ‖W + s_i·B_i A_i‖`` (math in
            :mod:`fused_lora.ops`). The fused launches above run on drop(x)
            (each row dropped with its adapter's probability, the mask drawn
            as :func:`dora_linear`'s) and each row's output feature is
            scaled by its adapter's γ (1 for LoRA adapters and rows of
            none), every DoRA adapter's norm in one launch (one read of W),
            and, with dropout, the correction ``(x - drop(x)) Wᵀ``. An adapter of
            rank 0 has no magnitude (a ValueError).

    The sum of the ranks is the rank the kernels run, and picks the plan
    as a single adapter of that rank would (:func:`fused_lora.explain`).
    The adapters are concatenated for each call (``torch.cat``, a copy of
    their weights, differentiable); :func:`fused_lora.reference` computes
    the same through :func:`fused_lora.reference.lora_linear_checked`.

    Returns:
        (..., out_features) in x's dtype. Gradients flow to x, to every
        adapter's A and B, and to weight and bias when they require grad.
    """
    lora_A, lora_B = _adapter_list("lora_A", lora_A), _adapter_list("lora_B", lora_B)
    if len(lora_A) != len(lora_B):
        raise ValueError(f"lora_A and lora_B must hold one tensor per adapter: got {len(lora_A)} A and "
                         f"{len(lora_B)} B")
    n = len(lora_A)
    scalings = _adapter_scalings(scaling, n)
    dropouts = _adapter_dropouts(dropout_p, n)
    magnitudes = _adapter_magnitudes(magnitude, n)
    if isinstance(x, Tensor) and _autocast_enabled(x.device.type):
        x, weight, bias, *factors = _autocast(x.device.type, x, weight, bias, *lora_A, *lora_B, *magnitudes)
        lora_A, lora_B, magnitudes = factors[:n], factors[n:2 * n], factors[2 * n:]
    for i, (a, b) in enumerate(zip(lora_A, lora_B)):
        try:
            _, _, seed = check_lora_args(x, weight, a, b, bias, scalings[i], dropouts[i], seed, min_rank=0,
                                         weight_scale=weight_scale)
        except (TypeError, ValueError) as error:
            raise type(error)(f"adapter {i} (lora_A[{i}], lora_B[{i}]): {error}") from None
    weight_scale = check_weight_scale(x, weight, weight_scale)
    weight_code = check_weight_code(x, weight, weight_code)
    # (int32 once here, not in each pass: the values are checked, so none wraps)
    adapter_ids = _check_adapter_id_values(check_adapter_ids(x, adapter_ids), n, adapter_ids).to(torch.int32)
    ranks = tuple(a.shape[0] for a in lora_A)
    for i, m in enumerate(magnitudes):
        if m is not None:
            if not ranks[i]:
                raise ValueError(f"magnitude[{i}]: adapter {i} has rank 0 (it leaves the layer alone), so it has no "
                                 "DoRA magnitude; pass None for it")
            try:
                check_magnitude(x, weight, m)
            except (TypeError, ValueError) as error:
                raise type(error)(f"adapter {i} (magnitude[{i}]): {error}") from None
    if any(m is not None for m in magnitudes):
        return _multi_dora(x, weight, lora_A, lora_B, magnitudes, adapter_ids, bias, scalings, dropouts, seed,
                           backend, weight_scale, weight_code)
    if not any(ranks):  # (every adapter of rank 0 leaves the layer alone: its base, for every row)
        y = torch.nn.functional.linear(x, weight if weight_scale is None else dequantize_base(
            weight, weight_scale, x.dtype, weight_code), bias)
        if _unreadable(adapter_ids):  # (an id that could not be checked, made -2: NaN, as the kernels give it)
            y = torch.where((adapter_ids < -1).unsqueeze(-1), float("nan"), y)
        return y
    # Each adapter's own dropout probability, where they differ: row m's mask drawn with its adapter's, and its
    # 1/(1-p_i) in the adapter's column scales (the math in this module)
    dropout_p, adapter_p, per_adapter = max(dropouts), None, len(set(dropouts)) > 1
    if per_adapter:
        scalings = tuple(s / (1.0 - p) for s, p in zip(scalings, dropouts))
    if per_adapter:
        adapter_p = _kept_adapter_p(x.device, dropouts)
    a, b, adapters = _side_by_side(x, lora_A, lora_B, adapter_ids, scalings)
    return _lora_linear(x, weight, a, b, bias, 1.0, dropout_p, seed, None, adapters, backend, weight_scale,
                        weight_code, adapter_p)


def _side_by_side(x: Tensor, lora_A: list, lora_B: list, adapter_ids: Tensor, scalings: tuple[float, ...],
                  summed: bool = False):
    """``(A, B, (adapter_ids, rank_ids, rank_scaling))``: the adapters
    concatenated along the rank, and what the kernels select each row's
    columns by (:func:`_rank_columns`; ``summed``: every column adapter
    0's, :func:`_summed_columns`)."""
    # (while torch.compile traces, the tensors are made in the graph: it would not keep the cache's)
    compiling = torch.compiler.is_compiling()
    columns = (_make_summed_columns if compiling else _summed_columns) if summed else \
        (_make_rank_columns if compiling else _rank_columns)
    rank_ids, rank_scaling = columns(x.device, tuple(a.shape[0] for a in lora_A), scalings)
    a = lora_A[0] if len(lora_A) == 1 else torch.cat(lora_A, 0)
    b = lora_B[0] if len(lora_B) == 1 else torch.cat(lora_B, 1)
    return a, b, (adapter_ids, rank_ids, rank_scaling)


def _kept_adapter_p(device: torch.device, dropouts: tuple[float, ...]) -> Tensor:
    """:func:`_adapter_p`'s tensor (made in the graph while torch.compile traces)."""
    return (_make_adapter_p if torch.compiler.is_compiling() else _adapter_p)(device, dropouts)


def _multi_dora(x, weight, lora_A, lora_B, magnitudes, adapter_ids, bias, scalings, dropouts, seed, backend,
                weight_scale, weight_code) -> Tensor:
    """:func:`multi_lora_linear` with DoRA adapters, on checked arguments
    (``adapter_ids`` int32, of x's leading shape): ``y = γ_rows ⊙ z + b``,
    or with dropout ``γ_rows ⊙ z + (x - drop(x)) Wᵀ + b``, z the fused
    launches of the adapters side by side on drop(x) (no bias, no dropout
    of their own) and row m's γ its adapter's, 1 for a LoRA adapter or none
    (the math in this module)."""
    dropout_p, row_p, torch_backend = max(dropouts), None, resolve_backend(backend, x) == "torch"
    if dropout_p > 0.0:  # (each row's adapter's probability, 0 on a row of none: x's leading shape)
        adapter_p = torch.tensor(dropouts, dtype=torch.float64, device=x.device) if torch_backend and \
            x.dtype == torch.float64 else _kept_adapter_p(x.device, dropouts)  # (fp32, made on the device)
        row_p = torch.where(adapter_ids >= 0, adapter_p[adapter_ids.clamp(min=0)], 0.0)
    if torch_backend:
        if weight_scale is not None:
            weight = dequantize_base(weight, weight_scale, x.dtype, weight_code)
        return multi_dora_linear_checked(x, weight, lora_A, lora_B, magnitudes, adapter_ids, bias, scalings,
                                         dropout_p, seed, row_p)
    a, b, adapters = _side_by_side(x, lora_A, lora_B, adapter_ids, scalings)
    # Every DoRA adapter's norm in one read of W (detached: DoRA §4.3, PEFT)
    dora = tuple(m is not None for m in magnitudes)
    bounds, scales = (_make_dora_columns if torch.compiler.is_compiling() else _dora_columns)(
        x.device, tuple(t.shape[0] for t in lora_A), scalings, dora)
    max_rank = max(t.shape[0] for t, d in zip(lora_A, dora) if d)
    with torch.no_grad():
        norms = (_dora_norms_triton if direct_call(weight, a, b, weight_scale, weight_code)
                 else torch.ops.fused_lora.dora_norms)(weight.detach(), a.detach(), b.detach(), bounds, scales,
                                                       max_rank, weight_scale, weight_code)
    ones, norms = x.new_ones(norms.shape[1]), iter(norms)
    table = torch.stack([ones] + [ones if m is None else (m.to(torch.float32) / next(norms)).to(x.dtype)
                                  for m in magnitudes])
    # Each row's γ, table row id + 1 (an id below -1, whose row the kernels make NaN: row 0). An embedding: its
    # backward, each DoRA adapter's dγ summed over its rows, sorts the ids, no atomics (index_select's has them)
    gamma = torch.nn.functional.embedding(adapter_ids.clamp(min=-1).to(torch.int64) + 1, table)
    dropped = x if row_p is None else dora_dropped(x, dropout_p, seed, row_p)
    z = _lora_linear(dropped, weight, a, b, None, 1.0, 0.0, None, None, adapters, "triton", weight_scale,
                     weight_code)
    if row_p is None:
        return z * gamma if bias is None else torch.addcmul(bias, z, gamma)
    return torch.addcmul(_dora_correction(x, dropped, weight, bias, weight_scale, weight_code), z, gamma)


def summed_lora_linear(x: Tensor, weight: Tensor, lora_A: Sequence[Tensor], lora_B: Sequence[Tensor],
                       bias: Tensor | None = None, *, scaling: Sequence[float], weight_scale: Tensor | None = None,
                       weight_code: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Several adapters summed on every row, ``y = x Wᵀ + b + Σ_i s_i ·
    (x A_iᵀ) B_iᵀ`` (PEFT's several active adapters, ``set_adapter([a,
    b])``), without dropout, in one set of fused launches: the side-by-side
    form (math in this module) with every row of every adapter, ``w[m, j] =
    s_i`` on adapter i's columns. ``lora_A``, ``lora_B``, ``scaling``: the
    n >= 1 adapters' (ranks above 0), the rest as :func:`lora_linear`'s.
    The adapters are concatenated for each call, as
    :func:`multi_lora_linear`'s; gradients flow to each."""
    lora_A, lora_B = _adapter_list("lora_A", lora_A), _adapter_list("lora_B", lora_B)
    if len(lora_A) != len(lora_B):
        raise ValueError(f"lora_A and lora_B must hold one tensor per adapter: got {len(lora_A)} A and "
                         f"{len(lora_B)} B")
    scalings = _adapter_scalings(list(scaling), len(lora_A))
    if isinstance(x, Tensor) and _autocast_enabled(x.device.type):
        x, weight, bias, *factors = _autocast(x.device.type, x, weight, bias, *lora_A, *lora_B)
        lora_A, lora_B = factors[:len(lora_A)], factors[len(lora_A):]
    for i, (a, b) in enumerate(zip(lora_A, lora_B)):
        try:
            check_lora_args(x, weight, a, b, bias, scalings[i], 0.0, None, weight_scale=weight_scale)
        except (TypeError, ValueError) as error:
            raise type(error)(f"adapter {i} (lora_A[{i}], lora_B[{i}]): {error}") from None
    weight_scale = check_weight_scale(x, weight, weight_scale)
    weight_code = check_weight_code(x, weight, weight_code)
    ids = torch.zeros(x.shape[:-1], dtype=torch.int32, device=x.device)  # (every row adapter 0's: all columns)
    a, b, adapters = _side_by_side(x, lora_A, lora_B, ids, scalings, summed=True)
    return _lora_linear(x, weight, a, b, bias, 1.0, 0.0, None, None, adapters, backend, weight_scale, weight_code)


def _adapter_magnitudes(magnitude, n: int) -> list[Tensor | None]:
    """``magnitude`` of :func:`multi_lora_linear`: None (n LoRA adapters), or
    a list or tuple of n, each a tensor or None."""
    if magnitude is None:
        return [None] * n
    if isinstance(magnitude, Tensor) or not isinstance(magnitude, (list, tuple)):
        raise TypeError(f"magnitude must be None or a list or tuple of one tensor (or None) per adapter, got "
                        f"{type(magnitude).__name__}")
    if len(magnitude) != n:
        raise ValueError(f"magnitude must hold one entry per adapter ({n}), a tensor or None, got {len(magnitude)}")
    return list(magnitude)


def _adapter_list(name: str, factors) -> list[Tensor]:
    if isinstance(factors, Tensor) or not isinstance(factors, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, one per adapter, got {type(factors).__name__}")
    if not factors:
        raise ValueError(f"{name} must hold at least one adapter's tensor, got an empty {type(factors).__name__}")
    return list(factors)


def _adapter_dropouts(dropout_p, n: int) -> tuple[float, ...]:
    """Each adapter's dropout probability: ``dropout_p`` a float for all, or
    a sequence of n (each checked: a float in [0, 1))."""
    if isinstance(dropout_p, (list, tuple)):
        if len(dropout_p) != n:
            raise ValueError(f"dropout_p must hold one probability per adapter ({n}), got {len(dropout_p)}")
        return tuple(check_dropout_p(p, f"dropout_p[{i}]") for i, p in enumerate(dropout_p))
    return (check_dropout_p(dropout_p),) * n


def _adapter_p(device: torch.device, dropouts: tuple[float, ...]) -> Tensor:
    """The adapters' dropout probabilities, (n,) fp32 on ``device``, kept as
    :func:`_rank_columns`' pairs are (not while a CUDA graph captures)."""
    return _kept((device, "p", dropouts), _make_adapter_p, device, dropouts)


def _make_adapter_p(device: torch.device, dropouts: tuple[float, ...]) -> Tensor:
    """:func:`_adapter_p`'s tensor, made on the device by fills."""
    return torch.cat([torch.full((1,), p, dtype=torch.float32, device=device) for p in dropouts])


def _adapter_scalings(scaling, n: int) -> tuple[float, ...]:
    if isinstance(scaling, (list, tuple)):
        if len(scaling) != n:
            raise ValueError(f"scaling must hold one scale per adapter ({n}), got {len(scaling)}")
        return tuple(check_scaling(s) for s in scaling)
    return (check_scaling(scaling),) * n


#: ``adapter_ids`` tensors already read: tensor -> (its version then, its
#: lowest and highest id). A model's layers take the same tensor in one
#: forward: its values are read (a host sync) by the first alone, and again
#: only once changed in place (inference tensors, which keep no version,
#: every time), as :class:`fused_lora.LoRALinear`'s ids are.
_read_ids = WeakIdKeyDictionary()


def _id_range(given: Tensor, adapter_ids: Tensor) -> tuple[int, int]:
    """``(lowest, highest)`` of ``adapter_ids`` (``given`` as the caller
    passed it, of which it is a view): read once a version of ``given``."""
    entry = _read_ids.get(given)
    if entry is not None and not given.is_inference() and entry[0] == given._version:
        return entry[1:]
    low, high = torch.aminmax(adapter_ids)
    low, high = torch.stack([low, high]).tolist()  # (one sync)
    if not given.is_inference():
        _read_ids[given] = (given._version, low, high)
    return low, high


def _check_adapter_id_values(adapter_ids: Tensor, n: int, given: Tensor) -> Tensor:
    """``adapter_ids``, having raised a ValueError where an id is outside
    ``[-1, n)`` (one host sync, the first time ``given``, the caller's tensor
    of which ``adapter_ids`` is a view, comes). While torch.compile traces or a CUDA graph
    captures, where nothing can be read back, the ids with those outside
    made -2 instead (not left as they are: an int64 id would wrap to a
    valid int32 one): the kernels (and the reference) give a row of an id
    below -1 NaN."""
    if _unreadable(adapter_ids):
        return torch.where((adapter_ids >= -1) & (adapter_ids < n), adapter_ids, -2)
    if adapter_ids.numel():
        low, high = _id_range(given, adapter_ids)
        if low < -1 or high >= n:
            raise ValueError(f"adapter_ids must be -1 (the base alone) or an adapter's index in [0, {n}), "
                             f"got ids from {low} to {high}")
    return adapter_ids


def _unreadable(t: Tensor) -> bool:
    """Whether ``t``'s values cannot be read back to the host now: while
    torch.compile traces, or a CUDA graph captures on its device's stream."""
    return torch.compiler.is_compiling() or _capturing(t.device)


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph captures on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


#: :func:`_rank_columns`' pairs, by ``(device, ranks, scalings)``, the most
#: recently used last (at most :data:`_RANK_COLUMNS_KEPT`).
_rank_columns_kept: collections.OrderedDict = collections.OrderedDict()
_RANK_COLUMNS_KEPT = 256


def _rank_columns(device: torch.device, ranks: tuple[int, ...], scalings: tuple[float, ...]):
    """``(rank_ids, rank_scaling)``: the adapter and the scale of each rank
    column of adapters of ``ranks`` side by side, (r,) int32 and fp32 on
    ``device`` (:func:`_make_rank_columns`). Kept: a model's layers share a
    few such pairs, made once. Not while a CUDA graph captures on
    ``device``: a pair made then is written by the graph's replays alone,
    so it is made for that graph and not kept (a capture needs no warm-up
    call of the same ranks and scales for them)."""
    return _kept((device, ranks, scalings), _make_rank_columns, device, ranks, scalings)


def _kept(key: tuple, make, device: torch.device, *args):
    """``make(device, *args)``, kept under ``key`` (the most recently used
    :data:`_RANK_COLUMNS_KEPT`), but while a CUDA graph captures on ``device``."""
    made = _rank_columns_kept.get(key)
    if made is not None:
        _rank_columns_kept.move_to_end(key)
        return made
    made = make(device, *args)
    if not _capturing(device):
        _rank_columns_kept[key] = made
        while len(_rank_columns_kept) > _RANK_COLUMNS_KEPT:
            _rank_columns_kept.popitem(last=False)
    return made


def _dora_columns(device: torch.device, ranks: tuple[int, ...], scalings: tuple[float, ...],
                  dora: tuple[bool, ...]):
    """``(bounds, scales)`` of the DoRA adapters (``dora``) among adapters
    of ``ranks`` side by side: each one's rank columns ``[start, stop)``,
    (2 n_dora,) int32, and its scale, (n_dora,) fp32, on ``device``
    (:func:`fused_lora.kernels.dora.dora_norms`' tables), kept as
    :func:`_rank_columns`' pairs are."""
    return _kept((device, "dora", ranks, scalings, dora), _make_dora_columns, device, ranks, scalings, dora)


def _make_dora_columns(device: torch.device, ranks: tuple[int, ...], scalings: tuple[float, ...],
                       dora: tuple[bool, ...]):
    """:func:`_dora_columns`' pair, made on the device by fills."""
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    bounds = [v for i, d in enumerate(dora) if d for v in (starts[i], starts[i] + ranks[i])]
    scales = [s for s, d in zip(scalings, dora) if d]
    return (torch.cat([torch.full((1,), v, dtype=torch.int32, device=device) for v in bounds]),
            torch.cat([torch.full((1,), s, dtype=torch.float32, device=device) for s in scales]))


def _summed_columns(device: torch.device, ranks: tuple[int, ...], scalings: tuple[float, ...]):
    """:func:`summed_lora_linear`'s ``(rank_ids, rank_scaling)``: every
    column adapter 0's, each its own adapter's scale; kept as
    :func:`_rank_columns`' pairs are."""
    return _kept((device, "sum", ranks, scalings), _make_summed_columns, device, ranks, scalings)


def _make_summed_columns(device: torch.device, ranks: tuple[int, ...], scalings: tuple[float, ...]):
    """:func:`_summed_columns`' pair, made on the device by fills."""
    rank_ids, rank_scaling = _make_rank_columns(device, ranks, scalings)
    return torch.zeros_like(rank_ids), rank_scaling


def _make_rank_columns(device: torch.device, ranks: tuple[int, ...], scalings: tuple[float, ...]):
    """:func:`_rank_columns`' pair, made on the device by fills (no copy
    from the host, which a CUDA graph's capture cannot make; while
    torch.compile traces, in its graph)."""
    filled = [(torch.full((r,), i, dtype=torch.int32, device=device),
               torch.full((r,), s, dtype=torch.float32, device=device))
              for i, (r, s) in enumerate(zip(ranks, scalings)) if r]
    return torch.cat([ids for ids, _ in filled]), torch.cat([scales for _, scales in filled])
