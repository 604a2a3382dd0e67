"""Gradient clipping, with norm clipping folded into torch's fused AdamW on GPU.

``torch.nn.utils.clip_grad_norm_`` (what Composer's ``GradientClipping`` runs) makes two passes
over the gradients: one for the global norm, one that reads and writes every fp32 gradient to
multiply it by the clip coefficient (3.9 ms per step on one H100 at MPT-1B). Torch's fused
Adam/AdamW kernels already divide each gradient by an optional ``grad_scale`` tensor as they
load it (the hook GradScaler uses to unscale fp16 gradients), and then store the divided
gradient back. So clipping by norm can hand the kernel ``max(1, (norm + 1e-6) / max_norm)``:
the same update as ``clip_grad_norm_`` (the coefficient is divided in rather than multiplied, a
difference in the last bit), one read of the gradients and a kernel launch per tensor group
fewer (the store moves into the optimizer's pass), and no host synchronisation. After the step
the gradients are the clipped ones, as with Composer's clipping (unless the loss guard dropped
that update: the kernel then returns before storing them).

``gradient_clipping.implementation``: ``auto`` folds when it can (norm clipping, an optimizer
whose step takes ``grad_scale``, no fp16 loss scaling, which owns that hook) and runs Composer's
otherwise; ``fused`` insists (a spec that cannot is refused before training starts);
``composer`` always runs Composer's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from composer.algorithms import GradientClipping
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import ensure_tuple
from torch.distributed.tensor import DTensor

from mpt_train.config.checks import why_not_fused
from mpt_train.config.schema import GradientClippingConfig, OptimizerConfig
from mpt_train.errors import ConfigError
from mpt_train.train.host_reads import read_later

__all__ = ["FusedNormClipping", "build_gradient_clipping", "fold_norm_clip", "why_not_fused"]


def build_gradient_clipping(
    cfg: GradientClippingConfig, optimizer: OptimizerConfig, on_gpu: bool, precision: str
) -> tuple[list[GradientClipping], list[Callback]]:
    """(algorithms, callbacks) that clip as ``cfg`` asks (one list is empty).

    Called before the model is built: a spec asking for ``fused`` where it cannot be is
    refused before any GPU time is spent.
    """
    if cfg.implementation != "composer":
        why_not = why_not_fused(cfg, optimizer, on_gpu, precision)
        if not why_not:
            return [], [FusedNormClipping(cfg.clipping_threshold)]
        if cfg.implementation == "fused":
            raise ConfigError(
                "gradient_clipping.implementation", f"'fused' is not possible: {why_not}"
            )
    algorithm = GradientClipping(
        clipping_type=cfg.clipping_type, clipping_threshold=cfg.clipping_threshold
    )
    return [algorithm], []


def fold_norm_clip(
    params: Iterable[torch.nn.Parameter],
    optimizers: Iterable[torch.optim.Optimizer],
    max_norm: float,
) -> torch.Tensor | None:
    """Hand each optimizer the divisor that clips the gradients' global norm to ``max_norm``.

    Returns the global norm before clipping (a device tensor: nothing is read back here),
    or None when no parameter has a gradient. With FSDP2 the gradients are shards (DTensors)
    and the norm is all-reduced to the whole model's.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = scale = None
    if grads:
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); the kernel divides.
        scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)
    for optimizer in optimizers:
        optimizer.grad_scale = scale  # read by torch's fused Adam/AdamW step
    return norm


class FusedNormClipping(Callback):
    """Clips the global gradient norm to ``max_norm`` inside the fused optimizer step, and logs
    the norm before clipping as ``l2_norm/grad_preclip`` (the figure Megatron and torchtitan
    report; NaN or inf on a step whose gradients were, which the loss guard may then skip).

    Runs at ``AFTER_TRAIN_BATCH``, where Composer clips; gradients read at that event are the
    unclipped ones. The norm is copied to the host before the update is queued and read at
    ``BATCH_END`` (:mod:`mpt_train.train.host_reads`), so logging it waits for nothing.
    """

    def __init__(self, max_norm: float) -> None:
        self.max_norm = float(max_norm)
        self._norm: Callable[[], torch.Tensor] | None = None

    def after_train_batch(self, state: State, logger: Logger) -> None:
        params = state.model.parameters()
        norm = fold_norm_clip(params, ensure_tuple(state.optimizers), self.max_norm)
        self._norm = None if norm is None else read_later(norm)

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._norm is not None:
            logger.log_metrics({"l2_norm/grad_preclip": float(self._norm())})
            self._norm = None
