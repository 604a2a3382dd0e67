"""ALiBi (Press et al., 2022) exactly as MPT defines it.

Each head h adds ``slope_h * (k_pos - q_pos)`` to its attention scores (a linear penalty on
distance to the past). MPT's slopes are ``2 ** (-alibi_bias_max * i / H')`` for i = 1..H' with
H' the next power of two >= n_heads; when n_heads is not a power of two MPT keeps the odd
entries then the even ones and truncates to n_heads (llm-foundry ``gen_slopes``, transformers
``build_mpt_alibi_tensor``). MPT itself biases by ``k_pos - (S_k - 1)``; under a causal mask
that differs from ``k_pos - q_pos`` by a per-row constant, which softmax ignores, and the
relative form is what a kernel ``score_mod`` can compute from (q_idx, kv_idx) alone.

Legend: H heads, Q query length, K key length.
"""

from __future__ import annotations

import math

import torch

__all__ = ["alibi_bias", "alibi_slopes"]


def alibi_slopes(
    n_heads: int, alibi_bias_max: float = 8, device: torch.device | str | None = None
) -> torch.Tensor:
    """Per-head ALiBi slopes, float32 ``[H]``, MPT's ordering for any head count."""
    n_pow2 = 2 ** math.ceil(math.log2(n_heads))
    exponents = torch.arange(1, n_pow2 + 1, dtype=torch.float32, device=device)
    slopes = 1.0 / torch.pow(2, exponents * (alibi_bias_max / n_pow2))
    if n_pow2 != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


def alibi_bias(slopes_H: torch.Tensor, q_len: int, k_len: int, q_offset: int = 0) -> torch.Tensor:
    """Additive bias ``[H, Q, K]`` = slope * (k_pos - q_pos), query i at position q_offset + i.

    Positive entries (keys in the future) only occur where a causal mask removes them.
    """
    q_pos = torch.arange(q_offset, q_offset + q_len, device=slopes_H.device)
    k_pos = torch.arange(k_len, device=slopes_H.device)
    rel_QK = (k_pos[None, :] - q_pos[:, None]).to(slopes_H.dtype)
    return slopes_H[:, None, None] * rel_QK[None]
