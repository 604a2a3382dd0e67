"""FSDP2 on CPU ranks (gloo): every gradient collective a SUM, one division by the ranks.

FSDP2 averages fp32/bf16 gradients with ``ReduceOp.AVG``: a reduce-scatter over the ranks that
shard a parameter and, with HYBRID_SHARD, an all-reduce across the replicas (the nodes). NCCL
averages. torch 2.7's gloo silently sums in the reduce-scatter (pytorch/pytorch#162338: a CPU
run on N ranks would train on N times the gradient, which gradient clipping, the logged norm
and non-Adam optimizers all see) and refuses AVG in the all-reduce, so HYBRID_SHARD across
nodes of CPU ranks could not run at all.

The fix is the one FSDP2 itself uses for fp16: SUM in every collective and divide the result
once by the data-parallel size (shard ranks x replicas). A torch whose FSDP2 has the switch
(``FSDPModule.set_force_sum_reduction_for_comms``, torch >= 2.8) gets it turned on; on torch
2.7 the divide factors FSDP2 computes for its reductions are given for gloo groups only
(pre-divide 1 selects SUM, post-divide N averages), and NCCL groups are left as they are.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch.distributed as tdist
from composer.core import Callback, State
from composer.loggers import Logger
from torch.distributed.fsdp import FSDPModule

__all__ = ["GlooGradientAverage", "sum_then_divide_on_gloo"]

log = logging.getLogger(__name__)


def _divide_factors_for_gloo(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap torch 2.7's ``_get_gradient_divide_factors``: (1, N) where gloo reduces."""

    @functools.wraps(original)
    def factors(
        reduce_scatter_group: tdist.ProcessGroup,
        all_reduce_group: tdist.ProcessGroup | None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        got = original(reduce_scatter_group, all_reduce_group, *args, **kwargs)
        if got[0] is not None or tdist.get_backend(reduce_scatter_group) != "gloo":
            return got
        ranks = reduce_scatter_group.size()
        if all_reduce_group is not None:
            ranks *= all_reduce_group.size()
        return 1.0, float(ranks)

    factors.gloo_sums = True  # type: ignore[attr-defined]
    return factors


def sum_then_divide_on_gloo(modules: list[FSDPModule]) -> str:
    """Make FSDP2's gradient reductions SUMs followed by one division; returns how."""
    if hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        for module in modules:
            module.set_force_sum_reduction_for_comms(True)
        return "FSDP2's sum-only reductions"
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    current = _fsdp_collectives._get_gradient_divide_factors
    if not getattr(current, "gloo_sums", False):
        _fsdp_collectives._get_gradient_divide_factors = _divide_factors_for_gloo(current)
    return "SUM reductions divided by the data-parallel size"


class GlooGradientAverage(Callback):
    """Sets up the reductions of the module docstring before the first backward."""

    def fit_start(self, state: State, logger: Logger) -> None:
        modules = [m for m in state.model.modules() if isinstance(m, FSDPModule)]
        if not modules or tdist.get_backend() != "gloo":
            return
        how = sum_then_divide_on_gloo(modules)
        if tdist.get_rank() == 0:
            log.info("gloo cannot average gradients: FSDP2 uses %s", how)
