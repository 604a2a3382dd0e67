"""Build an MPT on the meta device and materialise it with one init function.

Building on ``meta`` allocates nothing, so a 70B model can be constructed, sharded by the
training layer and only then given real storage (``to_empty``) and values
(:func:`init_weights`). The same :func:`init_weights` serves a plain CPU/GPU build and any
FSDP ``param_init_fn`` path, so every route gives the same distribution.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from mpt_train.model.config import MPTConfig
from mpt_train.model.mpt import MPTModel
from mpt_train.model.norm import RMSNorm

__all__ = ["build_model", "init_weights", "residual_std_divisor"]

logger = logging.getLogger(__name__)


def residual_std_divisor(cfg: MPTConfig) -> float:
    """MPT divides residual output projections' init std by sqrt(2 * n_layers)."""
    return math.sqrt(2 * cfg.n_layers) if cfg.init_config.init_div_is_residual else 1.0


def _init_matrix(weight: torch.Tensor, cfg: MPTConfig) -> None:
    icfg = cfg.init_config
    if icfg.name == "kaiming_normal":
        # std = gain / sqrt(fan): sqrt(2) for relu (MPT's default), sqrt(2 / (1 + a^2)) for
        # leaky_relu with negative slope a = init_gain.
        nn.init.kaiming_normal_(
            weight, a=icfg.init_gain, mode=icfg.fan_mode, nonlinearity=icfg.init_nonlinearity
        )
    else:
        nn.init.normal_(weight, mean=0.0, std=icfg.init_std)


@torch.no_grad()
def init_weights(model: nn.Module, cfg: MPTConfig | None = None) -> None:
    """(Re-)initialise every parameter of an :class:`MPTModel` or of any of its submodules.

    Linear weights: kaiming-normal (or normal(init_std)); ``_is_residual`` layers divided by
    :func:`residual_std_divisor`. Embeddings: normal(emb_init_std) if set, else as linears.
    Biases zero, norm gains one.
    """
    if cfg is None:
        if not isinstance(model, MPTModel):
            raise TypeError("pass cfg when initialising a submodule of MPTModel")
        cfg = model.cfg
    div = residual_std_divisor(cfg)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            _init_matrix(module.weight, cfg)
            if getattr(module, "_is_residual", False):
                module.weight.div_(div)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            if cfg.init_config.emb_init_std is not None:
                nn.init.normal_(module.weight, mean=0.0, std=cfg.init_config.emb_init_std)
            else:
                _init_matrix(module.weight, cfg)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def build_model(cfg: MPTConfig, device: str | torch.device = "cpu") -> MPTModel:
    """Construct and initialise an MPT on ``device``.

    With ``cfg.init_device == 'meta'`` the model is built without storage, moved to ``device``
    with ``to_empty`` and filled by :func:`init_weights`; ``device='meta'`` returns it unfilled
    (shape-only, e.g. for parameter counts or a later sharded materialisation).
    """
    device = torch.device(device)
    build_device = torch.device("meta") if cfg.init_device == "meta" else device
    # Constructors' default inits draw random numbers; keep them off the caller's RNG stream so
    # that a meta build and a direct build give the same weights for the same seed.
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), build_device:
        model = MPTModel(cfg)
    if device.type == "meta":
        return model
    if build_device.type == "meta":
        model.to_empty(device=device)
    init_weights(model)
    logger.info("built MPT: %.1fM params on %s", model.num_params() / 1e6, device)
    return model
