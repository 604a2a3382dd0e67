"""FlexAttention path: ALiBi as a ``score_mod`` and causal / document masks as block masks.

FlexAttention only runs fast once ``torch.compile`` has generated a fused kernel for it, so on
CUDA the compiled function is built once per process and reused; inside a compiled block
(``compile.enabled``) the block's own compile generates it, in the block's graph. On CPU it runs eagerly (an
unfused reference that materialises the scores): torch 2.7's CPU FlexAttention compile path
has no backward (its lowering fails with ``IndexError`` when inputs need grad) and, on a
multi-threaded host, emits C++ that does not compile. Causal block masks are cached per
(sequence length, device); masks that depend on the batch's ``sequence_id`` are rebuilt every
call (they change with the data). Neither evaluates the mask over every (query, key) pair
when the length is a whole number of blocks.
Slopes are passed as a tensor captured by the score_mod, so new values never recompile.

Legend: B batch, H query heads, G key/value heads, Q/K/S query/key/sequence length, D head dim.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["BlockMask", "flex_attend", "flex_attention_available", "flex_block_mask"]

logger = logging.getLogger(__name__)

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import (
        BlockMask,
        create_block_mask,
        flex_attention,
    )

    _FLEX_IMPORT_ERROR: str | None = None
except ImportError as err:  # pragma: no cover - depends on the torch build
    _FLEX_IMPORT_ERROR = str(err)

    class BlockMask:  # type: ignore[no-redef]
        """Placeholder: 'flex' is refused at build time on this torch."""


def flex_attention_available() -> str | None:
    """None when FlexAttention can be used, else the reason it cannot."""
    return _FLEX_IMPORT_ERROR


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    """Compile FlexAttention once; eager FlexAttention is a slow reference only."""
    logger.info("compiling FlexAttention (once per process)")
    return torch.compile(flex_attention, dynamic=False)


def _causal(
    b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
) -> torch.Tensor:
    return kv_idx <= q_idx


#: FlexAttention's default sparse block size (queries and keys).
_BLOCK = 128


@functools.lru_cache(maxsize=32)
def _causal_block_mask(seq_len: int, device: torch.device) -> BlockMask:
    """Causal block mask. For whole blocks it is written down directly (row ``i``: blocks
    ``0..i-1`` full, block ``i`` partial) instead of evaluating the mask over every (query, key)
    pair: at StoryWriter's 65k tokens that evaluation is a 4.3 GB temporary on the GPU."""
    if seq_len % _BLOCK:
        return create_block_mask(
            _causal, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device
        )
    n = seq_len // _BLOCK
    rows = torch.arange(n, device=device, dtype=torch.int32)
    blocks = torch.arange(n, device=device, dtype=torch.int32).expand(n, n)
    # Indices are read up to each row's count; what lies past it is never looked at.
    partial_idx = torch.cat([rows[:, None], blocks[:, : n - 1]], dim=1)
    return BlockMask.from_kv_blocks(
        kv_num_blocks=torch.ones(1, 1, n, device=device, dtype=torch.int32),
        kv_indices=partial_idx[None, None].contiguous(),
        full_kv_num_blocks=rows[None, None].clone(),
        full_kv_indices=blocks[None, None].contiguous(),
        BLOCK_SIZE=_BLOCK,
        mask_mod=_causal,
        seq_lengths=(seq_len, seq_len),
    )


def _same_doc_mask_mod(seq_id_BS: torch.Tensor) -> Callable[..., torch.Tensor]:
    def causal_same_doc(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        return (kv_idx <= q_idx) & (seq_id_BS[b, q_idx] == seq_id_BS[b, kv_idx])

    return causal_same_doc


def _document_block_mask(seq_id_BS: torch.Tensor) -> BlockMask:
    """Causal same-document block mask, classified from per-block id ranges.

    ``create_block_mask`` evaluates the mask over every (query, key) pair, ``[B, S, S]``: a
    17 GB temporary for a batch of four 65k-token rows. Here a block pair is decided from the
    smallest and largest document id of each block (``[B, S / 128]`` numbers): *empty* when the
    ranges do not overlap (no pair can share a document), *full* when both blocks hold one and
    the same document, *partial* (the mask_mod decides per token) otherwise. That is exact for
    packed rows (ids non-decreasing, as text packing writes them) and conservative, never
    wrong, for any other ids such as fine-tuning's ``-1`` padding.
    """
    batch, seq_len = seq_id_BS.shape
    mask_mod = _same_doc_mask_mod(seq_id_BS)
    if seq_len % _BLOCK:
        return create_block_mask(
            mask_mod, B=batch, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=seq_id_BS.device
        )
    n = seq_len // _BLOCK
    ids_BNT = seq_id_BS.view(batch, n, _BLOCK)
    lo_BN, hi_BN = ids_BNT.amin(-1), ids_BNT.amax(-1)
    q_lo, q_hi = lo_BN[:, :, None], hi_BN[:, :, None]  # query block i on rows
    kv_lo, kv_hi = lo_BN[:, None, :], hi_BN[:, None, :]  # key block j on columns
    overlap_BNN = (kv_lo <= q_hi) & (q_lo <= kv_hi)
    one_doc_BNN = (q_lo == q_hi) & (kv_lo == kv_hi) & (q_lo == kv_lo)
    below = torch.ones(n, n, dtype=torch.bool, device=seq_id_BS.device).tril(-1)
    diagonal = torch.eye(n, dtype=torch.bool, device=seq_id_BS.device)
    full_BNN = below & one_doc_BNN
    partial_BNN = ((below & ~one_doc_BNN) | diagonal) & overlap_BNN
    kv_num, kv_idx = _as_kv_blocks(partial_BNN)
    full_num, full_idx = _as_kv_blocks(full_BNN)
    return BlockMask.from_kv_blocks(
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        BLOCK_SIZE=_BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(seq_len, seq_len),
    )


def _as_kv_blocks(selected_BNN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block, the count and (first in each row) the indices of the selected key
    blocks, shaped ``[B, 1, N]`` and ``[B, 1, N, N]`` as ``BlockMask.from_kv_blocks`` wants."""
    num_BN = selected_BNN.sum(-1, dtype=torch.int32)
    # A stable sort of "not selected" puts the selected columns first, in ascending order.
    idx_BNN = torch.argsort((~selected_BNN).to(torch.int8), dim=-1, stable=True)
    return num_BN[:, None].contiguous(), idx_BNN.to(torch.int32)[:, None].contiguous()


def flex_block_mask(
    seq_len: int, seq_id_BS: torch.Tensor | None, device: torch.device
) -> BlockMask:
    """Causal (and, with ``seq_id_BS``, same-document) block mask over ``seq_len`` tokens."""
    if seq_id_BS is None:
        return _causal_block_mask(seq_len, device)
    return _document_block_mask(seq_id_BS)


def flex_attend(
    q_BHQD: torch.Tensor,
    k_BGKD: torch.Tensor,
    v_BGKD: torch.Tensor,
    *,
    slopes_H: torch.Tensor | None,
    softmax_scale: float,
    seq_id_BS: torch.Tensor | None = None,
    compiled: bool | None = None,
    block_mask: BlockMask | None = None,
    kernel_options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Causal self-attention (Q == K) with optional ALiBi and document masking.

    ``compiled`` forces the compiled (True) or eager (False) kernel; None compiles on CUDA only.
    ``block_mask`` is :func:`flex_block_mask` of this call's arguments, when the caller built it
    once for all layers. ``kernel_options`` go to FlexAttention's generated kernel as they are
    (tile sizes, warps, stages, ``USE_TMA``...); None keeps torch's choice for the GPU.

    Incremental decoding (Q < K) is not routed here: each step would be a new static shape,
    i.e. a recompilation; the caller uses SDPA with the same bias for those steps.
    """
    q_len, k_len = q_BHQD.shape[2], k_BGKD.shape[2]
    assert q_len == k_len, "flex_attend is for full sequences; decode steps use sdpa"
    if block_mask is None:
        block_mask = flex_block_mask(q_len, seq_id_BS, q_BHQD.device)

    score_mod = None
    if slopes_H is not None:
        slopes = slopes_H.float()

        def score_mod(
            score: torch.Tensor,
            b: torch.Tensor,
            h: torch.Tensor,
            q_idx: torch.Tensor,
            kv_idx: torch.Tensor,
        ) -> torch.Tensor:
            return score + slopes[h] * (kv_idx - q_idx)

    if torch.compiler.is_compiling():
        # Inside a compiled block the surrounding torch.compile generates the fused kernel;
        # reaching for the separately compiled function from there would break the graph.
        flex_fn = flex_attention
    else:
        if compiled is None:
            compiled = q_BHQD.is_cuda
        flex_fn = _compiled_flex() if compiled else flex_attention
    return flex_fn(
        q_BHQD,
        k_BGKD,
        v_BGKD,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=softmax_scale,
        enable_gqa=q_BHQD.shape[1] != k_BGKD.shape[1],
        kernel_options=kernel_options,
    )
