"""Tiny-model factory for the model tests (d_model 64, 2 layers: fast on a shared 2-core CPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from mpt_train.model import AttentionConfig, MPTConfig, MPTModel, build_model

TINY: dict[str, Any] = dict(
    d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=97, expansion_ratio=4
)


def tiny_config(attn: dict[str, Any] | None = None, **overrides: Any) -> MPTConfig:
    """A tiny MPTConfig; ``attn`` holds AttentionConfig fields."""
    return MPTConfig(**{**TINY, **overrides}, attn_config=AttentionConfig(**(attn or {})))


def perturb_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Move norm gains/biases off their init values so weight-mapping mistakes show up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "_ln" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.fixture
def make_model() -> Callable[..., MPTModel]:
    """``make_model(attn={...}, seed=0, **MPTConfig fields)`` -> initialised tiny MPTModel."""

    def _make(attn: dict[str, Any] | None = None, seed: int = 0, **overrides: Any) -> MPTModel:
        torch.manual_seed(seed)
        return build_model(tiny_config(attn, **overrides))

    return _make


def clone_with(model: MPTModel, attn: dict[str, Any] | None = None, **overrides: Any) -> MPTModel:
    """Same weights, different config fields (e.g. another attention impl)."""
    cfg = model.cfg
    attn_fields = {**cfg.attn_config.__dict__, **(attn or {})}
    fields = {k: v for k, v in cfg.__dict__.items() if k not in ("attn_config", "init_config")}
    new_cfg = MPTConfig(
        **{**fields, **overrides},
        attn_config=AttentionConfig(**attn_fields),
        init_config=cfg.init_config,
    )
    other = build_model(new_cfg)
    other.load_state_dict(model.state_dict())
    return other
