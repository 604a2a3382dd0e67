"""MPT self-attention: fused QKV projection, optional QK-LayerNorm / clipping, GQA, KV cache,
and five kernels that all apply the same causal mask, ALiBi bias and document mask.

Kernels (``AttentionConfig.impl``, mapped by plain if/else in :func:`attend`):
  * ``torch``  explicit matmul + fp32 softmax; the readable reference.
  * ``sdpa``   ``F.scaled_dot_product_attention`` with ALiBi folded into the query/key heads
               (:func:`mpt_train.model.alibi.fold_alibi`), so training stays ``is_causal``
               on its flash kernels; a mask only for packed documents, and an ALiBi bias
               while decoding over a cache.
  * ``flex``   FlexAttention with an ALiBi ``score_mod`` (see :mod:`mpt_train.model.flex`).
  * ``flash``  flash-attn 2 with ``alibi_slopes`` (GPU only, checked at build time).
  * ``cudnn``  cuDNN's fused attention with ALiBi inside the kernel
               (:mod:`mpt_train.model.cudnn_attention`; GPU only, checked at build time).
               Decoding over a cache and fp32 inputs run the ``sdpa`` path.
Queries are always the last Q positions of the K keys (Q < K while decoding with a cache).

Legend: B batch, S new tokens, H query heads, G key/value heads, Q query length,
K key length (past + new), D head dim, M d_model.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mpt_train.model.alibi import alibi_bias, alibi_slopes, fold_alibi
from mpt_train.model.availability import check_attention_impl, flash_attn_2_missing
from mpt_train.model.config import MPTConfig
from mpt_train.model.cudnn_attention import cudnn_attend
from mpt_train.model.flex import BlockMask, flex_attend, flex_block_mask
from mpt_train.model.kernels import KERNELS, kernel
from mpt_train.model.norm import build_norm

__all__ = [
    "AttnMask",
    "KVCache",
    "MPTAttention",
    "attend",
    "check_attention_impl",
    "flash_attn_2_missing",
    "sdpa_mask",
    "shared_mask",
]

logger = logging.getLogger(__name__)

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_BGKD, v_BGKD) of one layer


_SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def _repeat_kv(x_BGKD: torch.Tensor, n_heads: int) -> torch.Tensor:
    n_rep = n_heads // x_BGKD.shape[1]
    return x_BGKD if n_rep == 1 else x_BGKD.repeat_interleave(n_rep, dim=1)


def _keep_mask(
    q_len: int, k_len: int, seq_id_BS: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Boolean ``[B|1, 1, Q, K]``: causal (bottom-right aligned) and, if given, same document."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    keep_QK = torch.arange(k_len, device=device)[None, :] <= q_pos[:, None]
    if seq_id_BS is None:
        return keep_QK[None, None]
    same_doc_BQK = seq_id_BS[:, -q_len:, None] == seq_id_BS[:, None, :]
    return (keep_QK[None] & same_doc_BQK)[:, None]


def _torch_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes_H: torch.Tensor | None,
    scale: float,
    seq_id_BS: torch.Tensor | None,
    dropout_p: float,
) -> torch.Tensor:
    q_len, k_len = q.shape[2], k.shape[2]
    scores_BHQK = torch.matmul(q, k.transpose(-1, -2)) * scale
    if slopes_H is not None:
        scores_BHQK = scores_BHQK + alibi_bias(slopes_H, q_len, k_len, k_len - q_len).to(q.dtype)
    keep = _keep_mask(q_len, k_len, seq_id_BS, q.device)
    scores_BHQK = scores_BHQK.masked_fill(~keep, float("-inf"))
    probs_BHQK = torch.softmax(scores_BHQK.float(), dim=-1).to(v.dtype)
    probs_BHQK = F.dropout(probs_BHQK, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(probs_BHQK, v)


def _sdpa_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes_H: torch.Tensor | None,
    scale: float,
    seq_id_BS: torch.Tensor | None,
    dropout_p: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    q_len, k_len, head_dim = q.shape[2], k.shape[2], q.shape[3]
    fold = _folds_alibi(slopes_H, q_len, k_len)
    if fold:
        q, k, v = fold_alibi(q, k, v, slopes_H, scale)
    # SDPA aligns is_causal top-left: the causal mask when Q == K. (Branches, not
    # is_causal=<expression>: under torch.compile with dynamic shapes that would be symbolic.)
    if seq_id_BS is None and q_len == k_len:
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale
        )
    elif not _needs_mask(slopes_H, seq_id_BS, q_len, k_len):  # one query, no bias: all keys
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=False, scale=scale
        )
    else:
        if mask is None:
            bias = None if fold else slopes_H
            mask = sdpa_mask(bias, q_len, k_len, seq_id_BS, q.dtype, q.device)
        elif mask.dtype != q.dtype:
            mask = mask.to(q.dtype)  # SDPA needs them equal; the model builds it in q's dtype
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
    return out[..., :head_dim] if fold else out


def _folds_alibi(slopes_H: torch.Tensor | None, q_len: int, k_len: int) -> bool:
    """ALiBi goes into the heads for whole sequences (training, a prompt). Decoding over a
    cache adds it as an ``[H, Q, K]`` bias instead: small for a few queries, where widening
    would copy every cached key of every layer for each new token."""
    return slopes_H is not None and q_len == k_len


def _needs_mask(
    slopes_H: torch.Tensor | None, seq_id_BS: torch.Tensor | None, q_len: int, k_len: int
) -> bool:
    plain = q_len == k_len or (q_len == 1 and slopes_H is None)
    return seq_id_BS is not None or not plain


def sdpa_mask(
    slopes_H: torch.Tensor | None,
    q_len: int,
    k_len: int,
    seq_id_BS: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Additive causal (+ document) mask ``[B|1, 1, Q, K]``, plus the ALiBi bias
    ``[B|1, H, Q, K]`` when ``slopes_H`` is given. Additive in the queries' dtype rather than
    boolean: SDPA would otherwise convert a boolean mask in every layer and save each copy."""
    keep = _keep_mask(q_len, k_len, seq_id_BS, device)
    if slopes_H is None:
        return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, -math.inf)
    bias_HQK = alibi_bias(slopes_H, q_len, k_len, k_len - q_len).to(dtype)
    return bias_HQK[None].masked_fill(~keep, -math.inf)


AttnMask = torch.Tensor | BlockMask | None


def shared_mask(
    impl: str,
    slopes_H: torch.Tensor | None,
    q_len: int,
    k_len: int,
    seq_id_BS: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> AttnMask:
    """The mask every layer of one forward uses, built once by the model, outside the blocks.

    Built per layer, a compiled block would rebuild it (or a FlexAttention block mask) in every
    layer, and SDPA would save a copy per layer for backward. ``None`` where the kernel needs
    none (flash; SDPA over whole sequences without documents: causal, ALiBi in the heads) or
    builds its own (the ``torch`` reference).
    """
    if impl == "flex" and q_len == k_len:
        return flex_block_mask(q_len, seq_id_BS, device)
    if impl in ("sdpa", "flex", "cudnn") and _needs_mask(slopes_H, seq_id_BS, q_len, k_len):
        bias = None if _folds_alibi(slopes_H, q_len, k_len) else slopes_H
        return sdpa_mask(bias, q_len, k_len, seq_id_BS, dtype, device)
    return None


def _flash_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes_H: torch.Tensor | None,
    scale: float,
    dropout_p: float,
) -> torch.Tensor:
    from flash_attn import flash_attn_func  # checked importable at build time

    # flash-attn wants [B, S, H, D], handles GQA natively and aligns causal bottom-right.
    out_BQHD = flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=True,
        alibi_slopes=None if slopes_H is None else slopes_H.float(),
    )
    return out_BQHD.transpose(1, 2)


def _refuse_unsupported(impl: str, documents: bool, dropout: bool) -> None:
    """Called directly (no config in between), a kernel refuses what it would drop silently."""
    k = kernel(impl)
    if (documents and not k.document_masking) or (dropout and not k.dropout):
        lacks = [n for n, has in (("document masking", k.document_masking),
                                  ("attention dropout", k.dropout)) if not has]  # fmt: skip
        able = [n for n in KERNELS if all(getattr(KERNELS[n], f) for f in _FEATURES)]
        raise ValueError(
            f"impl {impl!r} has no {' or '.join(lacks)} (attn_config.attn_uses_sequence_id, "
            f"attn_pdrop); use impl {'/'.join(able)}"
        )


_FEATURES = ("document_masking", "dropout")


def attend(
    impl: str,
    q_BHQD: torch.Tensor,
    k_BGKD: torch.Tensor,
    v_BGKD: torch.Tensor,
    *,
    slopes_H: torch.Tensor | None,
    softmax_scale: float,
    seq_id_BS: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    mask: AttnMask = None,
    flex_kernel_options: dict[str, Any] | None = None,
    sdpa_backends: tuple[str, ...] | list[str] = (),
) -> torch.Tensor:
    """Causal attention of Q queries over K >= Q keys with the chosen kernel -> ``[B,H,Q,D]``.

    ``seq_id_BS`` (document ids over the K key positions) restricts attention to one document.
    ``mask`` is :func:`shared_mask` for these arguments when the caller has it (built here
    otherwise). ``sdpa_backends`` are the SDPA kernels allowed (``AttentionConfig.sdpa_backends``).
    """
    n_heads, q_len, k_len = q_BHQD.shape[1], q_BHQD.shape[2], k_BGKD.shape[2]
    _refuse_unsupported(impl, seq_id_BS is not None, dropout_p > 0)
    if impl == "flash":
        return _flash_attend(q_BHQD, k_BGKD, v_BGKD, slopes_H, softmax_scale, dropout_p)
    # cudnn: one query over one key (older cuDNN 9 refuses it causal) and fp32 take SDPA.
    half = q_BHQD.dtype in (torch.bfloat16, torch.float16)
    if impl == "cudnn" and q_len == k_len > 1 and half:
        return cudnn_attend(q_BHQD, k_BGKD, v_BGKD, slopes_H is not None, softmax_scale)
    if impl == "flex" and q_len == k_len:
        return flex_attend(
            q_BHQD,
            k_BGKD,
            v_BGKD,
            slopes_H=slopes_H,
            softmax_scale=softmax_scale,
            seq_id_BS=seq_id_BS,
            block_mask=mask,
            kernel_options=flex_kernel_options or None,
        )
    k_BHKD, v_BHKD = _repeat_kv(k_BGKD, n_heads), _repeat_kv(v_BGKD, n_heads)
    if impl == "torch":
        return _torch_attend(q_BHQD, k_BHKD, v_BHKD, slopes_H, softmax_scale, seq_id_BS, dropout_p)
    # flex decode steps (Q < K) would recompile per step; cudnn's ALiBi is top-left aligned only
    if impl in ("sdpa", "flex", "cudnn"):
        allowed = (
            sdpa_kernel([_SDPA_BACKENDS[name] for name in sdpa_backends])
            if sdpa_backends
            else contextlib.nullcontext()
        )
        with allowed:
            return _sdpa_attend(
                q_BHQD, k_BHKD, v_BHKD, slopes_H, softmax_scale, seq_id_BS, dropout_p, mask
            )
    raise ValueError(f"unknown attention impl {impl!r}")  # AttentionConfig validates earlier


class MPTAttention(nn.Module):
    """Fused-QKV causal self-attention (llm-foundry ``GroupedQueryAttention``; MHA when G == H)."""

    def __init__(self, cfg: MPTConfig) -> None:
        super().__init__()
        acfg = cfg.attn_config
        check_attention_impl(acfg.impl, acfg.sdpa_backends, acfg.flex_kernel_options)
        self.impl = acfg.impl
        self.n_heads, self.kv_n_heads, self.head_dim = cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
        self.clip_qkv = acfg.clip_qkv
        self.softmax_scale = acfg.softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.attn_pdrop = acfg.attn_pdrop
        self.flex_kernel_options = dict(acfg.flex_kernel_options)
        self.sdpa_backends = tuple(acfg.sdpa_backends)
        self.alibi, self.alibi_bias_max = acfg.alibi, acfg.alibi_bias_max
        kv_dim = self.kv_n_heads * self.head_dim
        self.Wqkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * kv_dim, bias=not cfg.no_bias)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=not cfg.no_bias)
        self.out_proj._is_residual = True  # init divides its std by sqrt(2 * n_layers)
        self.q_ln = self.k_ln = None
        if acfg.qk_ln:
            bias = not cfg.no_bias
            self.q_ln = build_norm(cfg.norm_type, cfg.d_model, cfg.norm_eps, bias)
            self.k_ln = build_norm(cfg.norm_type, kv_dim, cfg.norm_eps, bias)

    def forward(
        self,
        x_BSM: torch.Tensor,
        seq_id_BS: torch.Tensor | None = None,
        past_kv: KVCache | None = None,
        mask: AttnMask = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Return the attention output ``[B,S,M]`` and this layer's updated (k, v) cache.

        The ALiBi slopes are made here, in fp32, rather than passed in: a sharding wrapper casts
        a block's floating-point inputs to its compute dtype, and bf16 slopes are off by up to
        3e-3 (64 heads). A compiled block folds them into a constant.
        """
        batch, seq_len, d_model = x_BSM.shape
        qkv = self.Wqkv(x_BSM)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        kv_dim = self.kv_n_heads * self.head_dim
        q_BSM, k_BSN, v_BSN = qkv.split([d_model, kv_dim, kv_dim], dim=-1)
        if self.q_ln is not None:
            dtype = q_BSM.dtype
            q_BSM, k_BSN = self.q_ln(q_BSM).to(dtype), self.k_ln(k_BSN).to(dtype)
        q_BHSD = q_BSM.view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k_BGSD = k_BSN.view(batch, seq_len, self.kv_n_heads, self.head_dim).transpose(1, 2)
        v_BGSD = v_BSN.view(batch, seq_len, self.kv_n_heads, self.head_dim).transpose(1, 2)
        if past_kv is not None:
            k_BGSD = torch.cat([past_kv[0], k_BGSD], dim=2)
            v_BGSD = torch.cat([past_kv[1], v_BGSD], dim=2)
        slopes_H = (
            alibi_slopes(self.n_heads, self.alibi_bias_max, device=x_BSM.device)
            if self.alibi
            else None
        )
        out_BHSD = attend(
            self.impl,
            q_BHSD,
            k_BGSD,
            v_BGSD,
            slopes_H=slopes_H,
            softmax_scale=self.softmax_scale,
            seq_id_BS=seq_id_BS,
            dropout_p=self.attn_pdrop if self.training else 0.0,
            mask=mask,
            flex_kernel_options=self.flex_kernel_options,
            sdpa_backends=self.sdpa_backends,
        )
        out_BSM = out_BHSD.transpose(1, 2).reshape(batch, seq_len, d_model)
        return self.out_proj(out_BSM), (k_BGSD, v_BGSD)
