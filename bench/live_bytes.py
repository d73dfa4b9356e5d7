"""Memory a LoRA layer holds over one forward+backward, per path: kept for the backward, and at most.

    python bench/live_bytes.py [--m 512] [--k 512] [--n 512] [--r 16] [--dtype bfloat16]

Counts, on any machine, the bytes of the tensor storages that PyTorch's
operators make during one forward+backward of one layer (x requiring its
gradient, A and B trained, W and the bias frozen), live at once at most,
beyond the caller's tensors (x, W, b, A, B, dy) (:class:`fused_lora.testing.LiveBytes`,
a dispatch mode; a Triton kernel's output counts too, its launcher
allocating it with one): ``kept``, what is live at the end of the forward
but y (what the layer keeps for its backward: in a model, one such a
layer, the part that adds up over the layers), and ``peak``, the most
live at once over the forward and the backward (with the backward's
transient buffers, y and the gradients). In units of M·K bytes (M tokens,
K input features), at dropout 0 and 0.1, for:

* ``naive``: PEFT-style LoRA (base linear + dropout + A + B + scale + add);
* ``fused Triton plan``: fused_lora's kernels (here under the interpreter
  where there is no GPU: the same buffers);
* ``fused eager cuBLAS, recorded``: what an eager call on a GPU runs up to
  ``dispatch.EAGER_KEPT_MASK_MAX_M`` tokens (cuBLAS's products recorded for
  autograd, which keeps the mask and x ⊙ keep with dropout);
* ``fused Function cuBLAS``: what it runs above that many tokens with
  dropout (its autograd Function, ``ops._LoRALinearCublasFunction``, the
  mask drawn again in the backward).

Each path is run as the dispatch would run it on a GPU whatever M is
given (the rule stood in for on a machine without CUDA). A mode sees a
fused_lora op as one ``torch.library`` operator, so the script lets the op
run its passes as a plain eager call would (``ops.direct_call``). Not an
allocator's view: ``torch.cuda.max_memory_allocated`` (the benchmark's
memory column, on a GPU) adds its caching and rounding. PyTorch's dropout
on a CPU keeps its mask in x's dtype, where CUDA's keeps bytes: naive's
figures here are about one byte an element of x higher than on a GPU with
dropout.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import fused_lora  # noqa: E402
from fused_lora import dispatch, ops  # noqa: E402
from fused_lora.testing import LiveBytes, eager_cublas_here  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

#: The paths, in the order printed: (name, how the fused op runs; None: naive).
PATHS = (("naive", None), ("fused Triton plan", "triton"), ("fused eager cuBLAS, recorded", "recorded"),
         ("fused Function cuBLAS", "function"))


@contextlib.contextmanager
def _path(how: str):
    """Calls inside run fused_lora's ``how`` path, as a plain eager call
    would (not as one operator of the mode)."""
    saved = ops.direct_call
    ops.direct_call = lambda *tensors: True
    try:
        if how == "triton":
            with dispatch.use_eager_cublas(False):
                yield
        else:
            with eager_cublas_here(records=how == "recorded"):
                yield
    finally:
        ops.direct_call = saved


def measure(m: int = 512, k: int = 512, n: int = 512, r: int = 16, dtype: torch.dtype = torch.bfloat16) -> dict:
    """``{(path, p): (kept bytes, peak bytes)}`` of one forward+backward, p
    in (0, 0.1); each path runs twice, the second counted (the first
    primes, compiles, plans)."""
    torch.manual_seed(0)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(n, k, device=DEVICE, dtype=dtype) / k ** 0.5
    b = torch.randn(n, device=DEVICE, dtype=dtype)
    a = (torch.randn(r, k, device=DEVICE, dtype=dtype) / k ** 0.5).requires_grad_()
    bb = torch.randn(n, r, device=DEVICE, dtype=dtype).requires_grad_()
    dy = torch.randn(m, n, device=DEVICE, dtype=dtype)
    out = {}
    for p in (0.0, 0.1):
        for name, how in PATHS:
            if how == "function" and p == 0.0:
                continue  # (without dropout eager calls record the products at every M)

            def step(tracked=None):
                if how is None:
                    y = F.linear(x, w, b) + F.linear(F.linear(F.dropout(x, p), a), bb) * 2.0
                else:
                    y = fused_lora.lora_linear(x, w, a, bb, b, scaling=2.0, dropout_p=p, seed=7, backend="triton")
                kept = tracked.live - y.untyped_storage().nbytes() if tracked is not None else 0
                torch.autograd.grad(y, (x, a, bb), dy)
                return kept

            with _path(how) if how else contextlib.nullcontext():
                step()  # (priming, compilation, plans: not counted)
                tracked = LiveBytes(x, w, b, a, bb, dy)
                with tracked:
                    kept = step(tracked)
            out[(name, p)] = (kept, tracked.peak)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=512, help="tokens (default 512)")
    ap.add_argument("--k", type=int, default=512, help="in features (default 512)")
    ap.add_argument("--n", type=int, default=512, help="out features (default 512)")
    ap.add_argument("--r", type=int, default=16, help="rank (default 16)")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    res = measure(args.m, args.k, args.n, args.r, dtype)
    unit = args.m * args.k
    print(f"bytes live beyond the caller's tensors over one forward+backward, M={args.m}, {args.k} -> {args.n}, "
          f"r={args.r}, {args.dtype} on {DEVICE.type} (PyTorch's operators' storages, not an allocator's), in units "
          f"of M·K bytes ({unit / 2**20:.3g} MiB): kept for the backward, and at most at once")
    print(f"{'':30} {'kept p=0':>9} {'peak p=0':>9} {'kept p=0.1':>11} {'peak p=0.1':>11}")
    for name, _ in PATHS:
        cells = " ".join(f"{res[(name, p)][i] / unit:{width}.2f}" if (name, p) in res else f"{'—':>{width}}"
                         for p, width in ((0.0, 9), (0.1, 11)) for i in (0, 1))
        print(f"{name:30} {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
