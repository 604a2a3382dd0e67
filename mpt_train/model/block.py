"""One pre-norm MPT transformer block: ``x + attn(norm_1(x))`` then ``x + ffn(norm_2(x))``.

The block is the unit the training layer wraps for FSDP, activation checkpointing and
``torch.compile``; it holds no distributed logic itself.

Legend: B batch, S sequence, M d_model, F ffn hidden (expansion_ratio * M), H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpt_train.model.attention import AttnMask, KVCache, MPTAttention
from mpt_train.model.config import MPTConfig
from mpt_train.model.norm import build_norm

__all__ = ["MPTMLP", "MPTBlock"]


class MPTMLP(nn.Module):
    """``down_proj(gelu(up_proj(x)))`` with exact (erf) GELU, as MPT and transformers use."""

    def __init__(self, cfg: MPTConfig) -> None:
        super().__init__()
        hidden = cfg.expansion_ratio * cfg.d_model
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=not cfg.no_bias)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=not cfg.no_bias)
        self.down_proj._is_residual = True  # init divides its std by sqrt(2 * n_layers)

    def forward(self, x_BSM: torch.Tensor) -> torch.Tensor:
        h_BSF = F.gelu(self.up_proj(x_BSM), approximate="none")
        return self.down_proj(h_BSF)


class MPTBlock(nn.Module):
    """Pre-norm attention + MLP with residual dropout (``resid_pdrop``)."""

    def __init__(self, cfg: MPTConfig) -> None:
        super().__init__()
        bias = not cfg.no_bias
        self.norm_1 = build_norm(cfg.norm_type, cfg.d_model, cfg.norm_eps, bias)
        self.attn = MPTAttention(cfg)
        self.norm_2 = build_norm(cfg.norm_type, cfg.d_model, cfg.norm_eps, bias)
        self.ffn = MPTMLP(cfg)
        self.resid_attn_dropout = nn.Dropout(cfg.resid_pdrop)
        self.resid_ffn_dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(
        self,
        x_BSM: torch.Tensor,
        seq_id_BS: torch.Tensor | None = None,
        past_kv: KVCache | None = None,
        mask: AttnMask = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Return the block output ``[B,S,M]`` and the layer's updated KV cache.

        ``mask`` is the attention mask the model built once for all its blocks.
        """
        attn_BSM, kv = self.attn(self.norm_1(x_BSM), seq_id_BS, past_kv, mask)
        x_BSM = x_BSM + self.resid_attn_dropout(attn_BSM)
        x_BSM = x_BSM + self.resid_ffn_dropout(self.ffn(self.norm_2(x_BSM)))
        return x_BSM, kv
