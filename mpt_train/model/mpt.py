"""The MPT decoder-only language model (single device; parallelism is applied from outside).

Submodule names match transformers' ``MptForCausalLM`` minus its ``transformer.`` prefix
(``wte``, ``blocks.{i}.norm_1``, ``blocks.{i}.attn.Wqkv`` ...), so weights map one to one.
The output head is tied to the token embedding (``logits = h @ wte.weight.T``).

Legend: B batch, S new tokens, P past (cached) tokens, M d_model, V vocab, H heads.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from mpt_train.model.alibi import alibi_slopes
from mpt_train.model.attention import KVCache, shared_mask
from mpt_train.model.block import MPTBlock
from mpt_train.model.config import MPTConfig
from mpt_train.model.loss import ChunkLoss, lm_loss
from mpt_train.model.norm import build_norm

__all__ = ["MPTModel"]

logger = logging.getLogger(__name__)


def _attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype queries will have: autocast's when it is on, else the activations'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class MPTModel(nn.Module):
    """MPT: token embedding, ``n_layers`` :class:`MPTBlock`, final norm, tied LM head."""

    def __init__(self, cfg: MPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.learned_pos_emb else None
        self.emb_drop = nn.Dropout(cfg.emb_pdrop)
        self.blocks = nn.ModuleList(MPTBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_f = build_norm(cfg.norm_type, cfg.d_model, cfg.norm_eps, not cfg.no_bias)
        self.loss_head = ChunkLoss()  # no parameters: the head is the tied embedding
        self._warned_sequence_id = False
        self._flops_params: int | None = None

    def alibi_slopes(self, device: torch.device) -> torch.Tensor | None:
        """ALiBi slopes ``[H]``, recomputed (cheap, meta-safe) rather than stored as a buffer."""
        acfg = self.cfg.attn_config
        if not acfg.alibi:
            return None
        return alibi_slopes(self.cfg.n_heads, acfg.alibi_bias_max, device=device)

    def _positions(
        self, seq_id_BS: torch.Tensor | None, past_len: int, seq_len: int, device: torch.device
    ) -> torch.Tensor:
        """Learned-position indices; they restart at 0 for every packed document."""
        pos_S = torch.arange(past_len, past_len + seq_len, device=device)
        if seq_id_BS is None:
            return pos_S[None]
        # Start of each token's document: the last index where the id changed.
        new_doc_BS = F.pad(seq_id_BS[:, 1:] != seq_id_BS[:, :-1], (1, 0), value=True)
        starts_BS = torch.where(new_doc_BS, pos_S[None], torch.zeros_like(seq_id_BS))
        return pos_S[None] - torch.cummax(starts_BS, dim=1).values

    def forward(
        self,
        input_ids: torch.Tensor,
        sequence_id: torch.Tensor | None = None,
        past_key_values: list[KVCache] | None = None,
        use_cache: bool = False,
        targets: torch.Tensor | None = None,
        loss_chunk_tokens: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, list[KVCache]]:
        """Logits ``[B,S,V]``, plus the per-layer KV cache when ``use_cache``.

        With ``targets`` ``[B,S]`` (the next token per position, ``-100`` for none) it returns
        the mean cross-entropy instead, computed in chunks of ``loss_chunk_tokens`` so the full
        logits never exist (:func:`mpt_train.model.loss.lm_loss`). The loss is computed inside
        ``forward`` so that a sharding wrapper has the tied head's weight gathered.

        ``sequence_id`` ``[B,S]`` marks packed documents; it is used (tokens never attend across
        documents) when ``attn_config.attn_uses_sequence_id`` is set, and ignored otherwise.
        ``past_key_values`` holds the cache of earlier tokens; ``input_ids`` are the new ones.
        """
        batch, seq_len = input_ids.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if sequence_id is not None and not self.cfg.attn_config.attn_uses_sequence_id:
            if not self._warned_sequence_id:
                logger.warning("sequence_id ignored: attn_config.attn_uses_sequence_id is false")
                self._warned_sequence_id = True
            sequence_id = None
        if sequence_id is not None and past_len:
            raise ValueError("sequence_id with past_key_values is not supported")
        if sequence_id is not None and sequence_id.shape != input_ids.shape:
            raise ValueError(f"sequence_id {tuple(sequence_id.shape)} != {(batch, seq_len)}")

        x_BSM = self.wte(input_ids)
        if self.wpe is not None:
            if past_len + seq_len > self.cfg.max_seq_len:
                raise ValueError(
                    f"{past_len + seq_len} tokens exceed max_seq_len {self.cfg.max_seq_len} "
                    "of the learned position embedding"
                )
            x_BSM = x_BSM + self.wpe(self._positions(sequence_id, past_len, seq_len, x_BSM.device))
        frac = self.cfg.embedding_fraction
        if frac < 1.0:
            # MPT's gradient shrink: same forward value, embedding gradient scaled by ``frac``.
            x_BSM = x_BSM * frac + x_BSM.detach() * (1.0 - frac)
        x_BSM = self.emb_drop(x_BSM)

        slopes_H = self.alibi_slopes(x_BSM.device)
        mask = shared_mask(
            self.cfg.attn_config.impl,
            slopes_H,
            seq_len,
            past_len + seq_len,
            sequence_id,
            _attention_dtype(x_BSM),
            x_BSM.device,
        )
        new_cache: list[KVCache] = []
        for i, block in enumerate(self.blocks):
            layer_past = None if past_key_values is None else past_key_values[i]
            x_BSM, kv = block(x_BSM, sequence_id, layer_past, mask)
            if use_cache:
                new_cache.append(kv)
        x_BSM = self.norm_f(x_BSM)

        if targets is not None:
            return lm_loss(
                x_BSM,
                self.wte.weight,
                targets,
                self.cfg.logit_scale,
                loss_chunk_tokens,
                chunk_loss=self.loss_head,
            )
        logits_BSV = F.linear(x_BSM, self.wte.weight.to(x_BSM.dtype))
        if self.cfg.logit_scale is not None:
            logits_BSV = logits_BSV * self.cfg.logit_scale
        return (logits_BSV, new_cache) if use_cache else logits_BSV

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; the tied LM head is the embedding and is counted once."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def flops_per_batch(self, batch_size: int, seq_len: int) -> int:
        """Training FLOPs (forward + backward) of one batch, llm-foundry's MFU convention.

        ``6 * N * T`` for the parameter matmuls (N = all parameters, embeddings included as
        llm-foundry counts them) plus ``12 * L * d_model * S * T`` for attention's QK^T and AV
        (T = batch_size * seq_len tokens, each attending to S positions, causality ignored).
        """
        tokens = batch_size * seq_len
        attn = 12 * self.cfg.n_layers * self.cfg.d_model * seq_len * tokens
        if self._flops_params is None:  # fixed once built; callbacks ask every step
            self._flops_params = self.num_params()
        return 6 * self._flops_params * tokens + attn
