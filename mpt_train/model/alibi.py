"""ALiBi (Press et al., 2022) exactly as MPT defines it.

Each head h adds ``slope_h * (k_pos - q_pos)`` to its attention scores (a linear penalty on
distance to the past). MPT's slopes are ``2 ** (-alibi_bias_max * i / H')`` for i = 1..H' with
H' the next power of two >= n_heads; when n_heads is not a power of two MPT keeps the odd
entries then the even ones and truncates to n_heads (llm-foundry ``gen_slopes``, transformers
``build_mpt_alibi_tensor``). MPT itself biases by ``k_pos - (S_k - 1)``; under a causal mask
that differs from ``k_pos - q_pos`` by a per-row constant, which softmax ignores, and the
relative form is what a kernel ``score_mod`` can compute from (q_idx, kv_idx) alone.

For the same reason the bias can be moved into the dot product itself (:func:`fold_alibi`):
``slope_h * k_pos`` is a product of a per-head and a per-key number, i.e. one more column in
q and in k. Plain causal attention over the widened heads is then ALiBi attention, and SDPA
keeps its flash kernels instead of reading an ``[H, Q, K]`` bias from memory.

Legend: B batch, H query heads, G key/value heads, Q query length, K key length, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["alibi_bias", "alibi_slopes", "fold_alibi"]

_BITS = 8  # significant bits per folded column: exact in bf16 and in TF32/bf16 matmuls


def alibi_slopes(
    n_heads: int, alibi_bias_max: float = 8, device: torch.device | str | None = None
) -> torch.Tensor:
    """Per-head ALiBi slopes, float32 ``[H]``, MPT's ordering for any head count."""
    n_pow2 = 1
    while n_pow2 < n_heads:  # not math.log2: under torch.compile(dynamic=True) n_heads is symbolic
        n_pow2 *= 2
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


def fold_alibi(
    q_BHQD: torch.Tensor,
    k_BGKD: torch.Tensor,
    v_BGKD: torch.Tensor,
    slopes_H: torch.Tensor,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Widen the heads so that ``softmax_scale * q'.k' = softmax_scale * q.k + slope_h * k_pos``.

    Returns q', k', v' with head dim D' (D plus the extra columns, rounded up to a multiple of
    8 as the fused SDPA kernels want; v is zero-padded, so ``out'[..., :D]`` is the output).
    The bias must survive the matmul exactly: bf16 holds integers only up to 256 and a slope to
    3 significant digits, and fp32 matmuls may round their inputs to TF32 (11 bits) or bf16.
    So each key position is written as base-256 digits and each ``slope / scale`` as a sum of
    three 8-bit parts: every column holds at most 8 significant bits, every product part x
    digit is exact in any of these modes, and the kernel's fp32 accumulator adds them up. Its
    rounding is relative to the largest term, ``slope * k_pos``: ~1e-7 of slope x K, a few
    1e-3 of a logit at 65k tokens with MPT's steepest slope. A kernel that adds scores in
    bf16 would lose the bias; SDPA's fused kernels accumulate in fp32 and its math kernel
    upcasts half precision unless told otherwise (refused by ``check_attention_impl``).
    """
    batch, n_heads, q_len, head_dim = q_BHQD.shape
    n_kv, k_len = k_BGKD.shape[1], k_BGKD.shape[2]
    dtype, device = q_BHQD.dtype, q_BHQD.device
    base = 2**_BITS
    n_parts = 3  # 3 x 8 bits carry an fp32 slope
    n_digits = 1
    while base**n_digits < k_len:
        n_digits += 1
    # Slopes are at most 1 (alibi_bias_max > 0): bound the largest column without a device sync.
    if base ** (n_digits - 1) / softmax_scale >= torch.finfo(dtype).max:
        raise ValueError(f"{k_len} key positions are too many to fold ALiBi into {dtype} heads")
    rest = slopes_H.float() / softmax_scale
    parts = []
    for _ in range(n_parts):
        parts.append(rest.to(torch.bfloat16).float())  # the leading 8 bits
        rest = rest - parts[-1]
    # Column (digit i, part p): q holds part_p * base**i (a power-of-two shift: still exact),
    # k holds digit i of the key position.
    q_cols = torch.stack([p * base**i for i in range(n_digits) for p in parts], -1)
    pos = torch.arange(k_len, device=device)
    k_cols = torch.stack([(pos // base**i) % base for i in range(n_digits) for _ in parts], -1)
    q_cols = q_cols.to(dtype)
    n_extra = q_cols.shape[-1]
    pad = -(head_dim + n_extra) % 8
    q_extra = F.pad(q_cols, (0, pad))[None, :, None, :].expand(batch, n_heads, q_len, -1)
    k_extra = F.pad(k_cols.to(dtype), (0, pad))[None, None].expand(batch, n_kv, k_len, -1)
    q_wide = torch.cat([q_BHQD, q_extra], dim=-1)
    k_wide = torch.cat([k_BGKD, k_extra], dim=-1)
    v_wide = F.pad(v_BGKD, (0, n_extra + pad))
    return q_wide, k_wide, v_wide
