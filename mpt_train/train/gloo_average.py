"""FSDP2 on CPU ranks (gloo): make the gradient a mean over ranks, as it is on GPUs.

FSDP2 reduce-scatters fp32/bf16 gradients with ``ReduceOp.AVG``. NCCL averages; torch's gloo
backend (2.7) silently sums instead (pytorch/pytorch#162338), so a CPU run on N ranks trains
on N times the gradient: Adam mostly hides the scale, but gradient clipping, the logged
gradient norm and every non-Adam optimizer see it. This callback asks gloo once, with a
one-element probe, what its "average" returns and, if it over-counts, divides each
reduce-scatter output by that factor in FSDP2's post-reduce hook (before it is accumulated
into the sharded gradient). A torch whose gloo averages is left alone.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as tdist
from composer.core import Callback, State
from composer.loggers import Logger
from torch.distributed.fsdp import FSDPModule

__all__ = ["GlooGradientAverage", "reduce_scatter_avg_overcount"]

log = logging.getLogger(__name__)


def reduce_scatter_avg_overcount(group: tdist.ProcessGroup | None = None) -> float:
    """What an ``AVG`` reduce-scatter of ones returns on ``group``: 1.0 where it averages."""
    size = tdist.get_world_size(group)
    out = torch.empty(1)
    tdist.reduce_scatter_tensor(out, torch.ones(size), op=tdist.ReduceOp.AVG, group=group)
    return float(out)


class GlooGradientAverage(Callback):
    """See the module docstring. ``shard_group``: the ranks FSDP2 reduce-scatters over (the
    mesh's shard dimension with HYBRID_SHARD; None is every rank)."""

    def __init__(self, shard_group: tdist.ProcessGroup | None = None) -> None:
        self.shard_group = shard_group

    def fit_start(self, state: State, logger: Logger) -> None:
        modules = [m for m in state.model.modules() if isinstance(m, FSDPModule)]
        if not modules or tdist.get_backend(self.shard_group) != "gloo":
            return
        factor = reduce_scatter_avg_overcount(self.shard_group)
        if factor == 1.0:
            return

        def average(reduce_output: torch.Tensor) -> None:
            reduce_output.div_(factor)

        for module in modules:
            module.set_all_reduce_hook(average)
        if tdist.get_rank() == 0:
            log.info(
                "gloo sums where FSDP2 asks for an average (x%g): gradients are divided back "
                "after each reduce-scatter",
                factor,
            )
