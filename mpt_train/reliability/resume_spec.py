"""Resume only the run a checkpoint belongs to: the spec now against the spec it was saved with.

Autoresume picks the newest checkpoint in ``save_folder`` by its name alone. If the spec changed
in between (fewer layers, another optimizer, another precision), Composer would load what fits,
drop the rest without a word and keep training a different model, rotating away the old run's
checkpoints as it goes. Every checkpoint records the spec that wrote it (in its manifest, and in
the checkpoint itself), so the two are compared before anything is loaded, moved or rotated.

Only a short list of keys may change on a resume (:data:`MAY_CHANGE`, :data:`MAY_CHANGE_WARN`);
any other change is refused with every changed key listed as ``key: saved -> now``. A user who
means it names the keys in ``reliability.resume_allow_changes``; the accepted diff is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mpt_train.errors import ConfigError, RunFailure
from mpt_train.reliability.manifest import (
    MANIFEST_SUFFIX,
    CheckpointCorruptError,
    manifest_path,
    read_manifest,
)
from mpt_train.reliability.resume import checkpoint_batch, list_checkpoints

__all__ = [
    "MAY_CHANGE",
    "MAY_CHANGE_WARN",
    "ResumeSpecError",
    "check_resume_spec",
    "check_spec_change",
    "flatten",
    "refused_changes",
    "saved_spec",
    "saved_spec_in_bucket",
    "spec_changes",
]

log = logging.getLogger(__name__)

#: Keys (and everything below them) that may change on a resume without a word: how long to
#: train, how to evaluate, log, save and account, and how the step is computed, none of which
#: changes what a checkpoint holds.
MAY_CHANGE: tuple[str, ...] = (
    "max_duration",
    "run_name",
    "variables",
    "eval_loader",
    "eval_loaders",
    "eval_interval",
    "eval_first",
    "eval_subset_num_batches",
    "device_eval_batch_size",
    "icl_tasks",
    "loggers",
    "callbacks",
    "cost",
    "progress_bar",
    "save_folder",
    "save_interval",
    "save_num_checkpoints_to_keep",
    "save_overwrite",
    "autoresume",
    "load_path",
    "load_weights_only",
    "load_strict_model_weights",
    "reliability",
    "device",
    "device_train_microbatch_size",
    "compile",
    "loss",
    "overlap_step_end",
    "fsdp.activation_checkpointing",
    "fsdp.activation_cpu_offload",
)

#: Keys that may change with a warning: the run goes on from the same state, but its curve
#: from here on is not the one the old settings would have drawn.
MAY_CHANGE_WARN: tuple[str, ...] = (
    "optimizer.lr",
    "optimizer.weight_decay",
    "optimizer.betas",
    "optimizer.eps",
    "scheduler",
    "gradient_clipping",
    "train_loader",
    "finetune_loader",
)

_UNSET = "(unset)"


class ResumeSpecError(ConfigError):
    """The spec now changes what the checkpoint to resume holds; the message lists the keys."""

    def __init__(self, msg: str) -> None:
        super().__init__("", msg)


def flatten(spec: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}`` for a nested spec; lists and ``None`` are leaves."""
    if isinstance(spec, dict) and spec:
        out: dict[str, Any] = {}
        for k, v in spec.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: spec}


def spec_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Every leaf key whose value differs, as ``(key, saved, now)``, sorted by key."""
    a, b = flatten(saved), flatten(now)
    out = []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, _UNSET), b.get(key, _UNSET)
        if old != new:
            out.append((key, old, new))
    return out


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def refused_changes(
    saved: dict[str, Any], now: dict[str, Any], allow: Iterable[str] = ()
) -> list[tuple[str, Any, Any]]:
    """The changes a resume must refuse: not on the may-change lists, nor allowed by name."""
    ok = (*MAY_CHANGE, *MAY_CHANGE_WARN, *allow)
    return [c for c in spec_changes(saved, now) if not _under(c[0], ok)]


def _show(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k}: {old} -> {new}" for k, old, new in changes)


def check_spec_change(
    checkpoint: str | Path, saved: dict[str, Any], now: dict[str, Any], allow: Iterable[str] = ()
) -> None:
    """Refuse to resume ``checkpoint`` with ``now`` if it changes what the checkpoint holds.

    Changes on :data:`MAY_CHANGE_WARN` and changes accepted by name are logged as warnings.

    Raises:
        ResumeSpecError: one line listing each refused key as ``key: saved -> now``.
    """
    allow = tuple(allow)
    changes = spec_changes(saved, now)
    refused = refused_changes(saved, now, allow)
    if refused:
        keys = ", ".join(k for k, _, _ in refused)
        raise ResumeSpecError(
            f"cannot resume from {checkpoint}: the spec changed what it holds ({_show(refused)}). "
            f"Nothing was loaded or moved. Give the new run another run_name or save_folder, "
            f"or accept the change with reliability.resume_allow_changes=[{keys}]"
        )
    warned = [c for c in changes if not _under(c[0], MAY_CHANGE)]
    accepted = [c for c in warned if not _under(c[0], MAY_CHANGE_WARN)]
    if accepted:
        log.warning(
            "resuming %s with changes accepted by reliability.resume_allow_changes: %s",
            checkpoint,
            _show(accepted),
        )
    cautious = [c for c in warned if c not in accepted]
    if cautious:
        log.warning(
            "resuming %s with a changed %s: %s",
            checkpoint,
            "learning rate, schedule or data",
            _show(cautious),
        )


def _spec_in_checkpoint(path: Path) -> dict[str, Any] | None:
    """The spec ``RunSpecRecorder`` stored in a one-file checkpoint of this run's own folder
    (trusted: this run wrote it), memory-mapped so the tensors are not read."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return ckpt["state"]["callbacks"]["RunSpecRecorder"]["spec"]
    except Exception as e:  # unreadable here: prepare_resume reports it with the file named
        log.debug("no spec readable from %s: %s", path, e)
        return None


def saved_spec(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """(checkpoint, spec it was saved with) for the newest checkpoint in ``folder`` that
    records one: from its manifest, else from the checkpoint file itself; None if none does."""
    if not folder.is_dir():
        return None
    for _batch, name in list_checkpoints(folder):
        path = folder / name
        mpath = manifest_path(folder, name)
        if mpath.exists():
            try:
                manifest = read_manifest(mpath)
            except CheckpointCorruptError:
                continue
            if manifest.spec is not None:
                return path, manifest.spec
        if path.is_file():
            spec = _spec_in_checkpoint(path)
            if spec is not None:
                return path, spec
    return None


def saved_spec_in_bucket(folder: str) -> tuple[str, dict[str, Any]] | None:
    """(checkpoint URL, spec) of the newest checkpoint under a bucket ``folder`` whose manifest
    records a spec; None if none does. Manifests are uploaded last, after every object of
    their checkpoint, so only complete checkpoints are considered; only the newest manifest
    is downloaded."""
    import tempfile

    from composer.utils import maybe_create_object_store_from_uri, parse_uri

    backend, bucket, prefix = parse_uri(folder)
    store = maybe_create_object_store_from_uri(folder)
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    manifests = []
    for name in store.list_objects(prefix):
        rest = name[len(prefix) :]
        batch = checkpoint_batch(rest)
        if "/" not in rest and rest.endswith(MANIFEST_SUFFIX) and batch is not None:
            manifests.append((batch, name))
    with tempfile.TemporaryDirectory() as tmp:
        for _batch, name in sorted(manifests, reverse=True):
            local = Path(tmp) / "manifest.json"
            store.download_object(name, str(local), overwrite=True)
            try:
                manifest = read_manifest(local)
            except CheckpointCorruptError:
                continue
            if manifest.spec is not None:
                url = f"{backend}://{bucket}/{name.removesuffix(MANIFEST_SUFFIX)}"
                return url, manifest.spec
    return None


def check_resume_spec(
    save_folder: str, run_name: str, now: dict[str, Any], allow: Iterable[str] = ()
) -> None:
    """Compare ``now`` with the spec of the checkpoint a resume of ``run_name`` would load
    (rank 0 reads, every rank gets the same answer), in a local folder or a bucket."""
    from composer.utils import dist, format_name_with_dist

    folder = format_name_with_dist(save_folder, run_name)
    problem: list[tuple[bool, str] | None] = [None]  # (whether a spec error, message)
    if dist.get_global_rank() == 0:
        try:
            found = saved_spec_in_bucket(folder) if "://" in folder else saved_spec(Path(folder))
        except Exception as e:  # a bucket that cannot be listed: every rank fails, naming it
            problem[0] = (
                False,
                f"cannot read the checkpoints in {folder}: {type(e).__name__}: {e}",
            )
            found = None
        if found is not None:
            saved = found[1]
            if saved.get("precision") == "auto":  # recorded unresolved: no dtype to compare
                saved = {**saved, "precision": now.get("precision")}
            try:
                check_spec_change(found[0], saved, now, allow)
            except ResumeSpecError as e:
                problem[0] = (True, e.msg)
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        spec_error, msg = problem[0]
        raise ResumeSpecError(msg) if spec_error else RunFailure(msg)
