"""A plan per sweep point before anything launches: fit, micro batch, predicted time and cost.

``scripts/sweep.py SWEEP.yaml --plan --gpus 64 --gpu h100`` runs the planner
(:mod:`mpt_train.tools.plan`) on every resolved point and launches only the points whose
per-rank memory fits the card; the others are listed with what would fit instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mpt_train.config import load_config
from mpt_train.errors import ConfigError
from mpt_train.tools.comm import SingleGPU
from mpt_train.tools.plan import Plan, make_plan

__all__ = ["PointPlan", "fitting_points", "format_point", "plan_points"]

log = logging.getLogger(__name__)


@dataclass
class PointPlan:
    """One point's plan; ``fits`` decides whether it launches."""

    index: int
    run_name: str
    plan: Plan

    @property
    def fits(self) -> bool:
        return self.plan.memory is None or self.plan.memory.fits


def plan_points(
    points: list, *, gpus: int, gpu: str, single_gpu: SingleGPU | None = None
) -> list[PointPlan]:
    """Plan every point (``mpt_train.tools.sweep.Point``) of a resolved sweep."""
    return [
        PointPlan(
            p.index,
            p.run_name,
            make_plan(
                load_config(p.spec),
                gpus=gpus,
                gpu=gpu,
                single_gpu=single_gpu,
                spec_name=p.run_name,
            ),
        )
        for p in points
    ]


def format_point(pp: PointPlan) -> str:
    """One line per point: what it needs and what it will cost, or why it is skipped."""
    p, m = pp.plan, pp.plan.memory
    assert m is not None
    ac = ", activation checkpointing" if m.activation_checkpointing else ""
    need = f"{m.total_gb:.1f} of {m.capacity_gb:.1f} GB per rank"
    if not pp.fits:
        instead = (
            f"micro batch {m.max_micro_batch} fits"
            if m.max_micro_batch
            else f"micro batch {m.max_micro_batch_ac} fits with activation checkpointing"
            if m.max_micro_batch_ac
            else "no micro batch fits on this many GPUs"
        )
        return (
            f"[{pp.index}] {pp.run_name}: does not fit ({need} at micro batch "
            f"{m.micro_batch}{ac}; {instead}): skipped"
        )
    return (
        f"[{pp.index}] {pp.run_name}: fits ({need}), micro batch {m.micro_batch}{ac} "
        f"(largest {m.max_micro_batch}), MFU {100 * p.mfu:.1f}%, {p.seconds / 3600:,.2f} h, "
        f"${p.cost_usd:,.{0 if p.cost_usd >= 100 else 2}f}"
    )


def fitting_points(points: list, gpus: int, gpu: str | None, mfu: float | None) -> list:
    """Print each point's plan; keep the points that fit."""
    kept = []
    for point in points:
        gpu_type = gpu or point.gpu_type
        if gpu_type is None:
            raise ConfigError("--gpu", "--plan needs a GPU type (--gpu, or cost.gpu_type)")
        single = SingleGPU(mfu, None) if mfu is not None else None
        (pp,) = plan_points([point], gpus=gpus, gpu=gpu_type, single_gpu=single)
        print(format_point(pp), flush=True)
        if pp.fits:
            kept.append(point)
    print(f"{len(kept)} of {len(points)} points fit {gpus} x {gpu or 'their GPU'}")
    return kept
