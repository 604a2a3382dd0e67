"""Surviving failures: checkpoint integrity and trust, loss guards (docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpt_train.reliability.checkpoints import (
    CheckpointIntegrity,
    CheckpointSaveError,
    CheckpointUploadError,
)
from mpt_train.reliability.config import LossGuardConfig, ReliabilityConfig
from mpt_train.reliability.guards import LossGuard, LossGuardStop
from mpt_train.reliability.manifest import CheckpointCorruptError
from mpt_train.reliability.resume import CheckpointLayoutError, check_resume_layout, prepare_resume
from mpt_train.reliability.resume_spec import ResumeSpecError, check_resume_spec
from mpt_train.reliability.trust import (
    UntrustedCheckpointError,
    check_load_path_trusted,
    load_weights_safely,
)
from mpt_train.reliability.watchdog import RankWatchdog

if TYPE_CHECKING:
    from composer.core import Callback

__all__ = [
    "CheckpointCorruptError",
    "CheckpointIntegrity",
    "CheckpointLayoutError",
    "CheckpointSaveError",
    "CheckpointUploadError",
    "LossGuard",
    "LossGuardConfig",
    "LossGuardStop",
    "RankWatchdog",
    "ReliabilityConfig",
    "ResumeSpecError",
    "UntrustedCheckpointError",
    "check_load_path_trusted",
    "check_resume_layout",
    "check_resume_spec",
    "load_weights_safely",
    "prepare_resume",
    "reliability_callbacks",
]


def reliability_callbacks(
    cfg: ReliabilityConfig,
    save_folder: str | None,
    run_dir: Path,
    spec: dict[str, Any] | None = None,
) -> list[Callback]:
    """The callbacks a run needs for its ``reliability`` section (``spec``: the resolved spec
    each checkpoint's manifest records).

    The S3 retry budget (``s3_max_attempts``) is set by the trainer before any bucket access,
    the collective timeout (``collective_timeout_s``) when the process group is created.
    """
    out: list[Callback] = [RankWatchdog(cfg.straggler_timeout_s)]
    if save_folder and cfg.checkpoint_manifest:
        out.append(CheckpointIntegrity(save_folder, cfg.min_free_space_factor, spec))
    if cfg.loss_guard is not None:
        out.append(LossGuard(cfg.loss_guard, run_dir))
    return out
