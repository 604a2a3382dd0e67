"""Train like ``train.py`` and record, before each batch, the float8 weight scales FSDP2 will
all-gather with: ``composer -n 2 tests/train/fp8_run.py OUT.json SPEC [overrides]``.

Rank 0 writes one row per batch: how many block linears hold torchao's float8 weight wrapper,
and how many of those carry a precomputed scale equal to ``float8 max / amax`` of the whole
(unsharded) current weight, i.e. computed after the last optimizer step.
"""

from __future__ import annotations

import json
import sys

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from mpt_train.cli import setup_logging
from mpt_train.config import load_config
from mpt_train.train.builder import build_trainer
from mpt_train.train.fp8 import plain_tensor


class ScaleProbe(Callback):
    def __init__(self, out: str) -> None:
        self.out = out
        self.rows: list[dict[str, int]] = []

    def batch_start(self, state: State, logger: Logger) -> None:
        from torchao.float8.float8_linear import Float8Linear
        from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

        linears = [m for m in state.model.modules() if isinstance(m, Float8Linear)]
        wrapped = fresh = 0
        for m in linears:
            local = getattr(m.weight, "_local_tensor", m.weight)
            if not isinstance(local, WeightWithDynamicFloat8CastTensor):
                continue
            wrapped += 1
            amax = plain_tensor(m.weight).full_tensor().abs().max().to(torch.float64)
            want = (torch.finfo(torch.float8_e4m3fn).max / amax).to(torch.float32)
            got = local._precomputed_scale
            fresh += int(got is not None and torch.equal(got.reshape(()), want))
        self.rows.append({"linears": len(linears), "wrapped": wrapped, "fresh_scales": fresh})

    def fit_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            with open(self.out, "w") as f:
                json.dump(self.rows, f)


def main() -> None:
    out, spec, *overrides = sys.argv[1:]
    setup_logging()
    trainer = build_trainer(load_config(spec, overrides), extra_callbacks=[ScaleProbe(out)])
    trainer.fit()
    trainer.close()


if __name__ == "__main__":
    main()
