"""Decoupled Lion (Chen et al. 2023), the optimizer of MPT-7B's published run.

Composer ships no Lion. The weight decay is decoupled the way Composer's DecoupledAdamW does it:
each step multiplies weights by ``1 - wd * lr / lr0``, so ``weight_decay`` is an absolute rate
that the schedule scales, independent of the base learning rate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["DecoupledLionW"]


class DecoupledLionW(torch.optim.Optimizer):
    """Sign-of-momentum updates; one state tensor per parameter (half of Adam's memory)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0.0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})
        for group in self.param_groups:
            group["initial_lr"] = group["lr"]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            decay = 1.0 - wd * lr / group["initial_lr"] if wd else 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                if decay != 1.0:
                    p.mul_(decay)
                update = exp_avg.mul(beta1).add_(p.grad, alpha=1.0 - beta1).sign_()
                p.add_(update, alpha=-lr)
                exp_avg.mul_(beta2).add_(p.grad, alpha=1.0 - beta2)
        return loss
