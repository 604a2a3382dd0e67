"""Normalisation layers MPT uses, chosen by ``MPTConfig.norm_type``.

``low_precision_layernorm`` is MPT's default: under autocast it runs LayerNorm in the autocast
dtype (bf16) instead of letting autocast promote it to fp32, which saves memory bandwidth on
GPU. Outside autocast (fp32) it is exactly ``nn.LayerNorm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LPLayerNorm", "RMSNorm", "build_norm"]


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device_type = x.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class LPLayerNorm(nn.LayerNorm):
    """LayerNorm computed in the autocast dtype (llm-foundry ``LPLayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x)
        if dtype is None:
            return super().forward(x)
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in fp32 (no bias by definition)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def build_norm(norm_type: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """Map ``norm_type`` to a module; ``bias`` is ignored by rmsnorm, which has none."""
    if norm_type == "low_precision_layernorm":
        return LPLayerNorm(dim, eps=eps, bias=bias)
    if norm_type == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if norm_type == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm_type {norm_type!r}")  # MPTConfig validates this earlier
