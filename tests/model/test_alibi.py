"""ALiBi slopes and bias against MPT's definition (transformers' build_mpt_alibi_tensor), and
the bias folded into the query/key heads for SDPA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from mpt_train.model.alibi import alibi_bias, alibi_slopes, fold_alibi
from mpt_train.model.attention import attend


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


@pytest.mark.parametrize(
    "dtype,k_len,n_extra",
    [
        (torch.float32, 200, 3),  # positions below 256: one digit, slope in three 8-bit parts
        (torch.float32, 5000, 6),  # two base-256 digits
        (torch.bfloat16, 200, 3),
        (torch.bfloat16, 5000, 6),
        (torch.bfloat16, 70000, 9),  # past 65536: three digits (StoryWriter-length context)
        (torch.float16, 5000, 6),
    ],
)
def test_folded_columns_add_exactly_the_alibi_bias(dtype, k_len: int, n_extra: int) -> None:
    """q'.k' scaled is q.k scaled plus slope * k_pos, to fp32 precision, with every folded
    column exact in bf16 (so also through TF32 or bf16-input matmuls); padding adds nothing."""
    torch.manual_seed(0)
    n_heads, head_dim, scale = 12, 64, 0.3  # slopes and 1/scale far from powers of two
    slopes = alibi_slopes(n_heads)
    q = torch.randn(1, n_heads, 3, head_dim).to(dtype)
    k, v = torch.randn(2, 1, 2, k_len, head_dim).to(dtype).unbind(0)  # two kv heads (GQA)
    qw, kw, vw = fold_alibi(q, k, v, slopes, scale)
    kw_h = kw.repeat_interleave(n_heads // 2, dim=1).double()
    plain = q.double() @ kw_h[..., :head_dim].transpose(-1, -2)
    added = (qw.double() @ kw_h.transpose(-1, -2) - plain) * scale
    want = slopes.double()[:, None, None] * torch.arange(k_len, dtype=torch.float64)
    # fp16's last slope part is subnormal for the smallest slopes: a few more ulps of fp32.
    rtol = 4e-6 if dtype == torch.float16 else 2e-7
    torch.testing.assert_close(added[0], want.expand_as(added[0]), rtol=rtol, atol=1e-9)
    for wide in (qw, kw):
        extra = wide[..., head_dim:]
        assert torch.equal(extra.to(torch.bfloat16).to(dtype), extra), "not exact in bf16"
    padded = head_dim + n_extra + (-(head_dim + n_extra) % 8)
    assert qw.shape == (1, n_heads, 3, padded) and kw.shape == vw.shape == (1, 2, k_len, padded)
    assert qw.dtype == kw.dtype == dtype
    assert torch.equal(qw[..., :head_dim], q) and torch.equal(kw[..., :head_dim], k)
    assert torch.equal(vw[..., :head_dim], v) and not vw[..., head_dim:].any()


def test_folding_refuses_positions_the_dtype_cannot_hold() -> None:
    q = torch.zeros(1, 1, 1, 8, dtype=torch.float16)
    k = v = torch.zeros(1, 1, 65537, 8, dtype=torch.float16)  # a third digit: 65536 / scale
    with pytest.raises(ValueError, match="65537 key positions"):
        fold_alibi(q, k, v, alibi_slopes(1), 1.0)


def _dense_alibi_sdpa(q, k, v, slopes, scale) -> torch.Tensor:
    """ALiBi as an additive [H, Q, K] bias: what SDPA was given before folding."""
    q_len, k_len = q.shape[2], k.shape[2]
    keep = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    bias = alibi_bias(slopes, q_len, k_len, k_len - q_len).to(q.dtype).masked_fill(~keep, -math.inf)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None], scale=scale)


@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_with_folded_alibi_is_as_accurate_as_a_dense_bias(backend, dtype) -> None:
    """Forward and gradients of ``attend('sdpa')`` against an fp64 reference at 600 tokens
    (two digits in bf16), on each CPU kernel SDPA may pick. In bf16 it is as accurate as
    handing SDPA the dense ALiBi bias; in fp32 the folded score is slope * k_pos, not
    slope * (k_pos - q_pos), so fp32 rounds it at that larger magnitude (~1e-5 here)."""
    torch.manual_seed(0)
    n_heads, seq, head_dim, scale = 8, 600, 32, 32**-0.5
    slopes = alibi_slopes(n_heads)
    base = [torch.randn(2, n_heads, seq, head_dim) for _ in range(3)]
    grad_out = torch.randn(2, n_heads, seq, head_dim)

    def run(fn, dt):
        q, k, v = (t.to(dt).clone().requires_grad_() for t in base)
        out = fn(q, k, v)
        out.backward(grad_out.to(dt))
        return [t.float() for t in (out, q.grad, k.grad, v.grad)]

    ref = run(
        lambda q, k, v: attend("torch", q, k, v, slopes_H=slopes, softmax_scale=scale),
        torch.float64,
    )
    with sdpa_kernel([backend]):
        folded = run(
            lambda q, k, v: attend("sdpa", q, k, v, slopes_H=slopes, softmax_scale=scale), dtype
        )
        dense = run(lambda q, k, v: _dense_alibi_sdpa(q, k, v, slopes, scale), dtype)
    largest_bias = slopes.max().item() * seq
    slack = 16 * torch.finfo(torch.float32).eps * largest_bias if dtype == torch.float32 else 0.0
    for name, r, f, d in zip(("out", "dq", "dk", "dv"), ref, folded, dense, strict=True):
        err_fold, err_dense = (f - r).abs().max().item(), (d - r).abs().max().item()
        assert err_fold <= 1.5 * err_dense + slack, (name, err_fold, err_dense)
