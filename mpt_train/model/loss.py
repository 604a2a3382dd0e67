"""Next-token loss through the tied output head, optionally in chunks.

The plain path materialises logits ``[B, S, V]`` in the compute dtype, then an fp32 copy for the
softmax, then their gradients: for MPT-1B at micro batch 6 x 2048 tokens and a 50k vocabulary
that is several GB, more than the rest of the activations of a block. The chunked path computes
head + cross-entropy ``chunk_tokens`` tokens at a time under activation checkpointing, so only
one chunk's logits ever exist; backward recomputes each chunk's head matmul (about a third of
the head's FLOPs extra). The result equals the plain path up to float summation order.

The per-chunk work (head matmul, fp32 upcast, cross-entropy) is :class:`ChunkLoss`, a module
without parameters, so the training layer can ``compile()`` it as it compiles the blocks:
Inductor then reads the bf16 logits once for the log-softmax and writes their gradient in
bf16, instead of materialising an fp32 copy, its softmax and its fp32 gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["IGNORE_INDEX", "ChunkLoss", "lm_loss"]

IGNORE_INDEX = -100


def _chunk_loss_sum(
    x_NM: torch.Tensor, weight_VM: torch.Tensor, targets_N: torch.Tensor, scale: float | None
) -> torch.Tensor:
    logits_NV = F.linear(x_NM, weight_VM.to(x_NM.dtype))
    if scale is not None:
        logits_NV = logits_NV * scale
    return F.cross_entropy(logits_NV.float(), targets_N, ignore_index=IGNORE_INDEX, reduction="sum")


class ChunkLoss(nn.Module):
    """Summed cross-entropy of ``x @ weight.T`` (times ``scale``) against ``targets``."""

    def forward(
        self,
        x_NM: torch.Tensor,
        weight_VM: torch.Tensor,
        targets_N: torch.Tensor,
        scale: float | None = None,
    ) -> torch.Tensor:
        return _chunk_loss_sum(x_NM, weight_VM, targets_N, scale)


def lm_loss(
    x_BSM: torch.Tensor,
    weight_VM: torch.Tensor,
    targets_BS: torch.Tensor,
    logit_scale: float | None = None,
    chunk_tokens: int = 0,
    chunk_loss: Callable[..., torch.Tensor] = _chunk_loss_sum,
) -> torch.Tensor:
    """Mean cross-entropy of ``x @ weight.T`` against ``targets`` (``-100`` = no loss).

    Args:
        x_BSM: final hidden states (after the last norm).
        weight_VM: output head (the tied token embedding).
        targets_BS: the token each position must predict.
        logit_scale: MPT's optional logit multiplier.
        chunk_tokens: 0 for the plain path; otherwise tokens per checkpointed chunk.
        chunk_loss: what computes one chunk's summed loss (a compiled :class:`ChunkLoss`).
    """
    x_NM = x_BSM.reshape(-1, x_BSM.shape[-1])
    targets_N = targets_BS.reshape(-1)
    count = (targets_N != IGNORE_INDEX).sum().clamp(min=1)
    if chunk_tokens <= 0 or chunk_tokens >= x_NM.shape[0]:
        return chunk_loss(x_NM, weight_VM, targets_N, logit_scale) / count
    total = x_NM.new_zeros((), dtype=torch.float32)
    for start in range(0, x_NM.shape[0], chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(
            chunk_loss,
            x_NM[start:end],
            weight_VM,
            targets_N[start:end],
            logit_scale,
            use_reentrant=False,
        )
    return total / count
