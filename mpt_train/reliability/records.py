"""A run's records (``config.yaml``, ``metrics.jsonl``, the cost ledger): never lost silently.

``runs/{run_name}/`` belongs to a run name, and a name is reused: a run restarted after a crash,
a finished run started again, another experiment under the same name. Once the checkpoint (if
any) is loaded, this callback knows which it is:

* resumed at batch B: the metrics rows the failed attempt wrote past B are moved aside, so the
  file holds one row per step and a loss curve drawn from it is the run's actual curve;
* starting at batch 0: the earlier rows are moved aside; so are ``config.yaml`` and the cost
  ledger when they belong to a finished run or to another spec (a restart of the same unfinished
  run keeps its ledger, whose time is charged as lost work).

"Aside" is a dated folder, ``runs/{run_name}/previous/<YYYYmmdd-HHMMSS>/``, and a warning says
where. Only rank 0 touches files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from mpt_train.reliability.resume_spec import refused_changes

__all__ = ["RunRecords", "aside_folder"]

log = logging.getLogger(__name__)

CONFIG = "config.yaml"


def aside_folder(run_dir: Path) -> Path:
    """A new, empty ``previous/<date-time>`` folder under ``run_dir``."""
    base = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    dest, n = base, 1
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    dest.mkdir(parents=True)
    return dest


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _ledger_finished(path: Path | None) -> bool:
    if path is None or not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("finished"))
    except (OSError, ValueError, AttributeError):
        return False


class RunRecords(Callback):
    """Set earlier records aside after the checkpoint is loaded, then write ``config.yaml``.

    Args:
        spec: The resolved, redacted spec (written to ``run_dir/config.yaml``).
        run_dir: ``runs/{run_name}``.
        metrics: The JSONL metrics file, if the run writes one.
        ledger: The cost ledger, if the run keeps one.
    """

    def __init__(
        self, spec: dict[str, Any], run_dir: Path, metrics: Path | None, ledger: Path | None
    ) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.metrics = metrics
        self.ledger = ledger
        self._aside: Path | None = None

    def after_load(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        batch = int(state.timestamp.batch)
        if batch > 0:
            self._roll_back_metrics(batch)
        else:
            self._set_aside_earlier_run()
        (self.run_dir / CONFIG).write_text(yaml.safe_dump(self.spec, sort_keys=False))

    def _dest(self) -> Path:
        if self._aside is None:
            self._aside = aside_folder(self.run_dir)
        return self._aside

    def _roll_back_metrics(self, batch: int) -> None:
        """Keep rows up to ``batch``; move the later ones (the failed attempt's) aside."""
        path = self.metrics
        if path is None or not path.is_file():
            return
        kept, dropped = [], []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                step = None  # a line cut short by the crash
            (kept if step is not None and step <= batch else dropped).append(line)
        if not dropped:
            return
        aside = self._dest() / path.name
        aside.write_text("".join(dropped), encoding="utf-8")
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
        log.warning(
            "resumed at batch %d: moved %d metrics row(s) the earlier attempt wrote past it "
            "from %s to %s",
            batch,
            len(dropped),
            path,
            aside,
        )

    def _set_aside_earlier_run(self) -> None:
        """A start at batch 0 under a name with records: keep them, in a dated folder."""
        moved = []
        if self.metrics is not None and self.metrics.is_file() and self.metrics.stat().st_size:
            moved.append(self.metrics)
        config = self.run_dir / CONFIG
        saved = _read_yaml(config) if config.is_file() else None
        other = not isinstance(saved, dict) or bool(refused_changes(saved, self.spec))
        if config.is_file() and (other or _ledger_finished(self.ledger)):
            moved.append(config)
            if self.ledger is not None and self.ledger.is_file():
                moved.append(self.ledger)
        if not moved:
            return
        dest = self._dest()
        for path in moved:
            shutil.move(path, dest / path.name)
        log.warning(
            "run %s starts at batch 0 and its name has records of an earlier run: moved %s to %s",
            self.run_dir.name,
            ", ".join(p.name for p in moved),
            dest,
        )
