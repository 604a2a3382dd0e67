"""Autoregressive sampling from an :class:`MPTModel`, with or without a KV cache.

With the cache, the prompt is run once and every later step feeds only the newest token; the
tokens must equal those of re-running the whole sequence each step (``use_cache=False``),
which is what the tests check. Sampling: greedy (``temperature=0``), temperature, top-k and
top-p (nucleus), drawing from an optional ``torch.Generator`` for reproducibility.

Legend: B batch, S sequence so far, V vocab.
"""

from __future__ import annotations

import torch

from mpt_train.model.mpt import MPTModel

__all__ = ["generate", "sample_next"]


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row ``[B]`` from last-position logits."""
    if temperature <= 0.0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k > 0:
        kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        cum_BV = torch.softmax(sorted_BV, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (keeps at least one).
        drop_sorted_BV = (cum_BV - torch.softmax(sorted_BV, dim=-1)) >= top_p
        drop_sorted_BV[..., 0] = False  # the most likely token always stays (top_p <= 0 too)
        drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: MPTModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return ``[B, S + n]`` = prompt followed by up to ``max_new_tokens`` generated tokens.

    Rows that emitted ``eos_token_id`` are padded with it; generation stops early once every
    row has. The model is put in eval mode for the call and restored afterwards.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    try:
        tokens_BS = input_ids
        done_B = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        cache = None
        for _ in range(max_new_tokens):
            if use_cache:
                step_ids = tokens_BS if cache is None else tokens_BS[:, -1:]
                logits_BSV, cache = model(step_ids, past_key_values=cache, use_cache=True)
            else:
                logits_BSV = model(tokens_BS)
            next_B = sample_next(logits_BSV[:, -1], temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                next_B = torch.where(done_B, torch.full_like(next_B, eos_token_id), next_B)
                done_B = done_B | (next_B == eos_token_id)
            tokens_BS = torch.cat([tokens_BS, next_B[:, None]], dim=1)
            if eos_token_id is not None and bool(done_B.all()):
                break
        return tokens_BS
    finally:
        model.train(was_training)
