"""Meta-device build, one init function, MPT's depth-scaled residual init."""

from __future__ import annotations

import math

import torch

from mpt_train.model import InitConfig, MPTConfig, build_model, init_weights
from mpt_train.model.config import AttentionConfig
from tests.model.conftest import tiny_config


def _expected_params(cfg: MPTConfig) -> int:
    """Closed-form count for a no-bias LayerNorm MPT: 12 d^2 per block + norms + embedding."""
    d = cfg.d_model
    return cfg.n_layers * (12 * d * d + 2 * d) + cfg.vocab_size * d + d


def test_meta_build_materialises_with_finite_outputs() -> None:
    cfg = tiny_config(init_device="meta")
    torch.manual_seed(0)
    model = build_model(cfg)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.num_params() == _expected_params(cfg)
    logits = model(torch.randint(0, cfg.vocab_size, (2, 16)))
    assert logits.shape == (2, 16, cfg.vocab_size) and torch.isfinite(logits).all()


def test_meta_and_cpu_builds_are_identical_given_the_seed() -> None:
    """One init function: building on meta then initialising equals building on CPU."""
    torch.manual_seed(7)
    on_cpu = build_model(tiny_config(no_bias=False))
    torch.manual_seed(7)
    on_meta = build_model(tiny_config(no_bias=False, init_device="meta"))
    for (name, a), b in zip(on_cpu.state_dict().items(), on_meta.state_dict().values()):
        assert torch.equal(a, b), name


def test_build_on_meta_device_allocates_nothing() -> None:
    cfg = MPTConfig(d_model=4096, n_heads=32, n_layers=32, init_device="meta")
    model = build_model(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.num_params() == _expected_params(cfg)


def test_kaiming_std_and_residual_scaling() -> None:
    n_layers, d = 8, 256
    cfg = MPTConfig(
        d_model=d, n_heads=4, n_layers=n_layers, vocab_size=512, max_seq_len=32, no_bias=False
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    plain = math.sqrt(2.0 / d)  # kaiming normal, fan_in, relu gain
    resid = plain / math.sqrt(2 * n_layers)
    block = model.blocks[3]
    for w, std in [
        (block.attn.Wqkv.weight, plain),
        (block.ffn.up_proj.weight, plain),
        (model.wte.weight, plain),
        (block.attn.out_proj.weight, resid),
        (block.ffn.down_proj.weight, math.sqrt(2.0 / (4 * d)) / math.sqrt(2 * n_layers)),
    ]:
        assert abs(w.std().item() / std - 1) < 0.02, (w.shape, w.std().item(), std)
        assert abs(w.mean().item()) < 0.05 * std
    assert torch.all(block.attn.Wqkv.bias == 0) and torch.all(block.norm_1.weight == 1)
    assert torch.all(block.norm_1.bias == 0)


def test_emb_init_std_and_normal_init() -> None:
    cfg = MPTConfig(
        d_model=256,
        n_heads=4,
        n_layers=2,
        vocab_size=1024,
        max_seq_len=32,
        init_config=InitConfig(
            name="normal", init_std=0.02, emb_init_std=0.5, init_div_is_residual=False
        ),
        attn_config=AttentionConfig(),
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    assert abs(model.wte.weight.std().item() / 0.5 - 1) < 0.02
    assert abs(model.blocks[0].attn.Wqkv.weight.std().item() / 0.02 - 1) < 0.02
    assert abs(model.blocks[0].attn.out_proj.weight.std().item() / 0.02 - 1) < 0.03


def test_init_weights_reinitialises_everything() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(no_bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    init_weights(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_init_gain_is_leaky_relus_slope_and_refused_where_it_would_do_nothing() -> None:
    import pytest

    from mpt_train.errors import ConfigError

    d = 512
    cfg = MPTConfig(d_model=d, n_heads=4, n_layers=1, vocab_size=64, max_seq_len=8,
                    init_config=InitConfig(init_nonlinearity="leaky_relu", init_gain=1.0))  # fmt: skip
    torch.manual_seed(0)
    w = build_model(cfg).blocks[0].attn.Wqkv.weight
    assert w.std().item() == pytest.approx(math.sqrt(1.0 / d), rel=0.02)  # sqrt(2/(1+1)) / sqrt(d)
    with pytest.raises(ConfigError, match="init_gain"):
        InitConfig(init_gain=1.0)  # relu ignores it
