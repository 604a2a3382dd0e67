"""ALiBi slopes and bias against MPT's definition (transformers' build_mpt_alibi_tensor)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from mpt_train.model.alibi import alibi_bias, alibi_slopes


@pytest.mark.parametrize("n_heads", [1, 2, 4, 6, 12, 16, 20, 24, 32, 40, 64])
@pytest.mark.parametrize("bias_max", [8, 4, 16])
def test_slopes_match_transformers(n_heads: int, bias_max: int) -> None:
    seq = 5
    ref_H1K = build_mpt_alibi_tensor(n_heads, seq, alibi_bias_max=bias_max)
    # transformers stores slope * (k - (seq - 1)); the column k = seq - 2 holds -slope.
    ref_slopes = -ref_H1K[:, 0, seq - 2]
    torch.testing.assert_close(alibi_slopes(n_heads, bias_max), ref_slopes, atol=0, rtol=0)


def test_power_of_two_slopes_are_the_geometric_sequence() -> None:
    expected = torch.tensor([2.0 ** (-8 * (i + 1) / 8) for i in range(8)])
    torch.testing.assert_close(alibi_slopes(8), expected)


def test_non_power_of_two_interleaves_the_next_power() -> None:
    """MPT (llm-foundry gen_slopes): for 6 heads use 8's slopes, odd entries then even ones."""
    s8 = alibi_slopes(8)
    torch.testing.assert_close(alibi_slopes(6), torch.cat([s8[1::2], s8[::2]])[:6])


def test_relative_bias_equals_mpt_bias_after_causal_softmax() -> None:
    """Our slope*(k - q) differs from MPT's slope*(k - (K-1)) by a per-row constant."""
    n_heads, seq = 6, 11
    slopes = alibi_slopes(n_heads)
    scores = torch.randn(n_heads, seq, seq)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    ours = (scores + alibi_bias(slopes, seq, seq)).masked_fill(~causal, float("-inf"))
    mpt = (scores + build_mpt_alibi_tensor(n_heads, seq)).masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(ours.softmax(-1), mpt.softmax(-1))


def test_bias_with_query_offset_is_the_bottom_rows() -> None:
    slopes = alibi_slopes(4)
    full = alibi_bias(slopes, 9, 9)
    torch.testing.assert_close(alibi_bias(slopes, 3, 9, q_offset=6), full[:, 6:])
    assert torch.all(full.diagonal(dim1=1, dim2=2) == 0)
    assert full[0, 5, 2] == -3 * slopes[0]
