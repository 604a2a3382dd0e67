"""One JSON object per logged step, for sweeps, plots and tests to read back.

Composer's callbacks log a step's metrics in several calls and under different step numbers
(the loss while the batch runs, throughput and lr after it). Everything logged from the start
of batch k until the start of batch k+1 (loss, throughput, lr, evaluations after batch k) is
merged into one line with ``"step": k`` (1-based, as the console shows it), written when the
next batch starts or the run ends.

The file is opened at the first write and appended to: the rows of an earlier attempt past the
checkpoint a run resumes from (or of an earlier run, for a run starting at batch 0) are moved
aside before that by :class:`mpt_train.reliability.records.RunRecords`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

__all__ = ["JsonlLogger", "read_metrics"]


class JsonlLogger(LoggerDestination):
    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._step: int | None = None
        self._row: dict[str, Any] = {}
        self._file: Any = None
        self._writer = False

    def init(self, state: State, logger: Logger) -> None:
        self._writer = dist.get_global_rank() == 0

    def eval_start(self, state: State, logger: Logger) -> None:
        if self._step is None:  # an evaluation before the first batch (eval_first): row 0
            self._step = int(state.timestamp.batch)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        # Runs after every BATCH_END callback has logged: the step's row is complete, and is
        # on disk before anything can go wrong in the next step.
        self._flush()

    def batch_start(self, state: State, logger: Logger) -> None:
        self._flush()
        self._step = int(state.timestamp.batch) + 1

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self._writer or self._step is None:
            return
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    continue
                v = v.item()
            if isinstance(v, int | float):
                self._row[k] = v if not isinstance(v, float) or math.isfinite(v) else str(v)

    def _flush(self) -> None:
        if self._writer and self._row and self._step is not None:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write(json.dumps({"step": self._step, **self._row}, sort_keys=True) + "\n")
            self._file.flush()
        self._row = {}

    def fit_end(self, state: State, logger: Logger) -> None:
        self._flush()

    def close(self, state: State, logger: Logger) -> None:
        self._flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        self._writer = False


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """One dict per step, in order of first appearance.

    Metrics logged for a step after its line was written (the final evaluation and timestamps
    at the end of training) come as a later line with the same ``step``; they are merged here.
    """
    rows: dict[int, dict[str, Any]] = {}
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.setdefault(row["step"], {}).update(row)
    return list(rows.values())
