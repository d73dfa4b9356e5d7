"""``LoRALinear``: a drop-in ``nn.Linear`` replacement with a fused LoRA adapter."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import check_backend
from .dropout import check_dropout_p
from .ops import lora_linear


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """``y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ`` with W and b frozen.

    Parameters ``weight`` (out, in), ``bias`` (out) or None, ``lora_A`` (r, in)
    and ``lora_B`` (out, r), initialised as PEFT does: the base like
    ``nn.Linear``, A kaiming-uniform(a=√5), B zeros (a fresh adapter changes
    nothing). ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
    Dropout applies to the LoRA path in ``train()`` mode only.

    ``merge()`` folds ``s·B·A`` into ``weight`` (the forward is then a plain
    linear); ``unmerge()`` restores the original weight bit for bit (the
    original is kept aside while merged, so merging costs one weight of memory).
    ``state_dict()`` always holds the unmerged weight.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 bias: bool = True, use_rslora: bool = False, device=None, dtype=None, *, backend: str = "auto"):
        super().__init__()
        self.in_features = _check_int("in_features", in_features, 0)
        self.out_features = _check_int("out_features", out_features, 0)
        self.r = _check_int("r", r, 1)
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite real number, got {alpha!r}")
        self.alpha = float(alpha)
        self.dropout = check_dropout_p(dropout, "dropout")
        self.use_rslora = bool(use_rslora)
        self.backend = check_backend(backend)
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.r, **factory))
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.reset_parameters()

    # -- construction ---------------------------------------------------------
    def reset_parameters(self) -> None:
        """Base as ``nn.Linear.reset_parameters``; adapter as PEFT."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                    use_rslora: bool = False, *, backend: str = "auto") -> "LoRALinear":
        """Wrap ``linear``: the new layer's ``weight`` and ``bias`` *are*
        ``linear``'s parameters (no copy; frozen here), the adapter is fresh,
        on the same device and in the same dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, r=r, alpha=alpha, dropout=dropout,
                        bias=linear.bias is not None, use_rslora=use_rslora, dtype=w.dtype, backend=backend)
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        layer.lora_A = nn.Parameter(torch.empty(layer.r, linear.in_features, device=w.device, dtype=w.dtype))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, layer.r, device=w.device, dtype=w.dtype))
        layer.reset_lora_parameters()
        return layer

    # -- the forward ----------------------------------------------------------
    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.bias, scaling=self.scaling,
                           dropout_p=self.dropout if self.training else 0.0, backend=self.backend)

    # -- merging ----------------------------------------------------------------
    def _delta_fp32(self) -> torch.Tensor:
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``s · B · A`` (out, in), computed in fp32 and cast to the weight's dtype."""
        return self._delta_fp32().to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` in place (same Parameter object)."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): the adapter is already merged")
        original = self.weight.detach().clone()
        self.weight.copy_((self.weight.detach().float() + self._delta_fp32()).to(self.weight.dtype))
        self._unmerged_weight = original

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight from before ``merge()``, bit for bit."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): the adapter is not merged")
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None

    # -- state_dict: always the unmerged weight ----------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + "weight"] = self._unmerged_weight if keep_vars else self._unmerged_weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if was_merged:
            self.merge()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:.4g}, dropout={self.dropout:g}, "
                f"bias={self.bias is not None}, use_rslora={self.use_rslora}, merged={self.merged}")
