"""MPT specifics: tied head, norms, embedding_fraction, logit_scale, dropout, FLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpt_train.model.norm import LPLayerNorm, RMSNorm
from tests.model.conftest import clone_with


def test_lm_head_is_tied_to_the_embedding(make_model) -> None:
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    assert not any("lm_head" in n for n in names) and "wte.weight" in names
    ids = torch.randint(0, 97, (1, 6))
    model(ids).sum().backward()
    # The embedding gets gradient from both the input lookup (rows of ids) and the head (all rows).
    unused = sorted(set(range(97)) - set(ids[0].tolist()))
    assert model.wte.weight.grad[unused].abs().sum() > 0


def test_no_bias_means_no_bias_anywhere(make_model) -> None:
    names = [n for n, _ in make_model().named_parameters()]
    assert not any(n.endswith("bias") for n in names)
    with_bias = [n for n, _ in make_model(no_bias=False).named_parameters() if n.endswith("bias")]
    assert "blocks.0.attn.Wqkv.bias" in with_bias and "blocks.0.norm_1.bias" in with_bias


def test_low_precision_layernorm() -> None:
    x = torch.randn(4, 8, 32)
    lp, ref = LPLayerNorm(32), nn.LayerNorm(32)
    with torch.no_grad():
        lp.weight.normal_()
        lp.bias.normal_()
        ref.load_state_dict(lp.state_dict())
    torch.testing.assert_close(lp(x), ref(x), atol=0, rtol=0)  # identical in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp_out, ref_out = lp(x), ref(x)
    assert lp_out.dtype == torch.bfloat16  # computed in the autocast dtype ...
    assert ref_out.dtype == torch.float32  # ... where autocast would run LayerNorm in fp32
    torch.testing.assert_close(lp_out.float(), ref(x), atol=0.05, rtol=0.02)


def test_rmsnorm_definition() -> None:
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 16)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_embedding_fraction_shrinks_only_the_embedding_gradient(make_model) -> None:
    """Forward unchanged; the lookup path's gradient is scaled by the fraction."""
    base = make_model()
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    grads, outs = {}, {}
    for frac in (1.0, 0.5, 0.25):
        model = clone_with(base, embedding_fraction=frac)
        outs[frac] = model(ids)
        outs[frac].square().mean().backward()
        grads[frac] = model.wte.weight.grad
    torch.testing.assert_close(outs[0.25], outs[1.0], atol=0, rtol=0)
    # wte.grad = head_grad + frac * lookup_grad, linear in frac.
    torch.testing.assert_close(grads[1.0] - grads[0.5], 2 * (grads[0.5] - grads[0.25]))
    assert (grads[1.0] - grads[0.5]).abs().max() > 1e-4


def test_logit_scale(make_model) -> None:
    base = make_model()
    scaled = clone_with(base, logit_scale=0.125)
    ids = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(scaled(ids), base(ids) * 0.125)


def test_dropout_only_in_training(make_model) -> None:
    model = make_model(emb_pdrop=0.2, resid_pdrop=0.2, attn={"attn_pdrop": 0.2})
    ids = torch.randint(0, 97, (2, 12))
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_exact_gelu_mlp(make_model) -> None:
    ffn = make_model().blocks[0].ffn
    x = torch.randn(2, 3, 64)
    expected = ffn.down_proj(F.gelu(ffn.up_proj(x), approximate="none"))
    torch.testing.assert_close(ffn(x), expected, atol=0, rtol=0)
    assert ffn.up_proj.out_features == 4 * 64


def test_learned_positions_are_bounded_by_max_seq_len(make_model) -> None:
    model = make_model(learned_pos_emb=True, max_seq_len=16, attn={"alibi": False})
    assert model.wpe.weight.shape == (16, 64)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_flops_per_batch_llm_foundry_convention(make_model) -> None:
    model = make_model(n_layers=3, d_model=128)
    n, L, d = model.num_params(), 3, 128
    assert n == L * (12 * d * d + 2 * d) + 97 * d + d
    assert model.num_params(exclude_embeddings=True) == n - 97 * d
    bs, msl = 6, 50
    # llm-foundry ComposerMPTCausalLM.flops_per_batch, written as it is there.
    params_flops_per_seq = 2 * n * msl
    attn_flops_per_seq = L * 2 * 2 * (d * (msl**2))
    assert model.flops_per_batch(bs, msl) == (params_flops_per_seq + attn_flops_per_seq) * 3 * bs
