"""Optimizers and schedulers, with MPT's parameter groups.

MPT decays matrices only: norm weights, biases and embeddings are left alone (configurable).
``decoupled_adamw`` is Composer's maths (weight decay scaled by lr / lr0, not by lr) run by
torch's foreach or fused AdamW kernel: with ``weight_decay = wd / lr0`` torch's update is the
same, and fused is much faster on GPU than Composer's per-parameter loop.
"""

from __future__ import annotations

import logging

import torch
from composer.optim import (
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    DecoupledAdamW,
    LinearWithWarmupScheduler,
)
from composer.optim.scheduler import ComposerScheduler

from mpt_train.config.checks import adamw_kernel
from mpt_train.config.schema import OptimizerConfig, SchedulerConfig
from mpt_train.train.lion import DecoupledLionW

__all__ = [
    "adamw_kernel",
    "build_optimizer",
    "build_scheduler",
    "param_groups",
    "takes_found_inf",
]

log = logging.getLogger(__name__)


def param_groups(model: torch.nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Split parameters into decayed and non-decayed groups by what they are."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embeddings
        is_norm_or_bias = p.ndim < 2 or name.endswith(".bias")
        if (is_embedding and not cfg.decay_embeddings) or (
            is_norm_or_bias and not is_embedding and not cfg.decay_norms_and_biases
        ):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch's fused Adam/AdamW: its step reads the ``grad_scale`` and ``found_inf``
    tensors set on the optimizer (GradScaler's hook) and leaves weights, moments and step
    count untouched where ``found_inf`` is 1, without the host reading anything."""
    return type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and all(
        g.get("fused") for g in optimizer.param_groups
    )


def build_optimizer(
    cfg: OptimizerConfig, model: torch.nn.Module, on_gpu: bool
) -> torch.optim.Optimizer:
    """``on_gpu``: the run trains on GPUs (the model may still be on the host or meta device)."""
    groups = param_groups(model, cfg)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    impl = adamw_kernel(cfg, on_gpu)
    if impl is None:
        return DecoupledLionW(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    if impl == "composer":
        return DecoupledAdamW(
            groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    # torch AdamW decays by lr_t * wd; Composer's decoupled form by (lr_t / lr0) * wd.
    wd = cfg.weight_decay / cfg.lr if cfg.name == "decoupled_adamw" else cfg.weight_decay
    for g in groups:
        if g.get("weight_decay") is None:
            g["weight_decay"] = wd
    kwargs = {"fused": True} if impl == "fused" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=wd, **kwargs)


def build_scheduler(cfg: SchedulerConfig) -> ComposerScheduler:
    if cfg.name == "cosine_with_warmup":
        return CosineAnnealingWithWarmupScheduler(
            t_warmup=cfg.t_warmup, t_max=cfg.t_max, alpha_f=cfg.alpha_f
        )
    if cfg.name == "linear_decay_with_warmup":
        return LinearWithWarmupScheduler(
            t_warmup=cfg.t_warmup, t_max=cfg.t_max, alpha_f=cfg.alpha_f
        )
    return ConstantWithWarmupScheduler(t_warmup=cfg.t_warmup, t_max=cfg.t_max)
