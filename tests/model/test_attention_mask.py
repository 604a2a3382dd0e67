"""Attention masks are built once per forward by the model, not once per layer."""

from __future__ import annotations

import pytest
import torch

import mpt_train.model.attention as attention
from mpt_train.model import AttentionConfig, MPTConfig, build_model


@pytest.mark.parametrize("packed", [False, True])
def test_mask_is_built_once_per_forward_and_never_reused_across_batches(
    packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = MPTConfig(
        d_model=32, n_heads=4, n_layers=3, max_seq_len=16, vocab_size=64,
        attn_config=AttentionConfig(impl="sdpa", attn_uses_sequence_id=packed),
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    built = []
    real = attention._keep_mask
    monkeypatch.setattr(attention, "_keep_mask", lambda *a: built.append(1) or real(*a))
    ids = torch.randint(0, 64, (2, 16))
    seq_a = torch.tensor([[0] * 8 + [1] * 8, [0] * 16])
    seq_b = torch.tensor([[0] * 4 + [1] * 12, [0] * 16])
    out_a = model(ids, sequence_id=seq_a if packed else None)
    assert len(built) == 1  # three layers, one mask
    out_b = model(ids, sequence_id=seq_b if packed else None)
    assert len(built) == 2  # a new forward (new batch) builds its own
    # Reference without the cache: a fresh torch-backend model with the same weights.
    ref_cfg = MPTConfig(
        d_model=32, n_heads=4, n_layers=3, max_seq_len=16, vocab_size=64,
        attn_config=AttentionConfig(impl="torch", attn_uses_sequence_id=packed),
    )  # fmt: skip
    ref = build_model(ref_cfg)
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(
        out_b, ref(ids, sequence_id=seq_b if packed else None), atol=1e-5, rtol=1e-5
    )
    if packed:
        assert not torch.allclose(out_a, out_b)


@pytest.mark.parametrize("packed", [False, True])
def test_flex_block_mask_is_built_once_per_forward(
    packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = MPTConfig(
        d_model=32, n_heads=4, n_layers=3, max_seq_len=16, vocab_size=64,
        attn_config=AttentionConfig(impl="flex", attn_uses_sequence_id=packed),
    )  # fmt: skip
    import mpt_train.model.flex as flex

    model = build_model(cfg)
    built = []
    real = flex.create_block_mask
    monkeypatch.setattr(flex, "create_block_mask", lambda *a, **k: built.append(1) or real(*a, **k))
    flex._causal_block_mask.cache_clear()
    seq = torch.tensor([[0] * 8 + [1] * 8, [0] * 16]) if packed else None
    model(torch.randint(0, 64, (2, 16)), sequence_id=seq)
    assert len(built) == 1  # three layers, one block mask


def test_sdpa_mask_is_built_in_the_autocast_dtype() -> None:
    """Under autocast the queries are bf16: a mask built in fp32 would be cast in every layer."""
    cfg = MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=64,
                    attn_config=AttentionConfig(impl="sdpa"))  # fmt: skip
    model = build_model(cfg)
    seen = []
    real = attention.shared_mask

    def spy(*args):
        out = real(*args)
        seen.append(out.dtype)
        return out

    import mpt_train.model.mpt as mpt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mpt, "shared_mask", spy)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randint(0, 64, (1, 16)))
        model(torch.randint(0, 64, (1, 16)))
    assert seen == [torch.bfloat16, torch.float32] and torch.isfinite(out).all()
