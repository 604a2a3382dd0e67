"""Checks that need the world outside the spec: ranks, files, buckets.

The spec's own consistency is checked by :mod:`mpt_train.config.checks`.

They run before any model is built, so a run that cannot succeed fails in seconds with the key
to fix, not after minutes of model init on a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from composer.utils import dist, format_name_with_dist

from mpt_train.config.schema import RunConfig
from mpt_train.data.config import TextLoaderConfig
from mpt_train.errors import ConfigError

__all__ = [
    "check_batch_split",
    "check_save_folder",
    "device_train_batch_size",
    "valid_world_sizes",
    "validate_run",
]

log = logging.getLogger(__name__)


def device_train_batch_size(cfg: RunConfig, world_size: int) -> int:
    """Per-rank batch size; the global batch must split evenly across ranks."""
    if cfg.global_train_batch_size % world_size:
        raise ConfigError(
            "global_train_batch_size",
            f"{cfg.global_train_batch_size} does not split across {world_size} ranks; "
            f"use a multiple of {world_size}",
        )
    return cfg.global_train_batch_size // world_size


def check_batch_split(cfg: RunConfig, world_size: int) -> int:
    """The per-rank batch on ``world_size`` ranks; it must split into whole microbatches."""
    per_rank = device_train_batch_size(cfg, world_size)
    mb = cfg.device_train_microbatch_size
    if isinstance(mb, int) and (mb > per_rank or per_rank % mb):
        raise ConfigError(
            "device_train_microbatch_size",
            f"{mb} must divide the per-rank batch {per_rank} "
            f"(global_train_batch_size {cfg.global_train_batch_size} / {world_size} ranks)",
        )
    return per_rank


def valid_world_sizes(cfg: RunConfig, up_to: int) -> list[int]:
    """GPU counts up to ``up_to`` that the spec's batch sizes split across."""
    out = []
    for n in range(1, up_to + 1):
        try:
            check_batch_split(cfg, n)
        except ConfigError:
            continue
        out.append(n)
    return out


def validate_run(cfg: RunConfig, world_size: int, *, probe_storage: bool = True) -> None:
    """Everything a run needs from its environment (data folders, task files, checkpoint
    paths, a writable save folder), checked up front. The spec's own consistency is
    :func:`mpt_train.config.checks.check_spec`'s, run before this."""
    check_batch_split(cfg, world_size)
    loaders = [("train_loader", cfg.train_loader), ("eval_loader", cfg.eval_loader)]
    loaders += [(f"eval_loaders.{label}", lo) for label, lo in cfg.eval_loaders.items()]
    for key, loader in loaders:
        if loader is not None:
            _check_local_data(key, loader)
    if cfg.finetune_loader is not None and not Path(cfg.finetune_loader.dataset.path).is_file():
        path = cfg.finetune_loader.dataset.path
        raise ConfigError("finetune_loader.dataset.path", f"JSONL file not found: {path}")
    for i, task in enumerate(cfg.icl_tasks):
        try:
            task.resolved_path()
        except ConfigError as err:
            raise err.with_prefix(f"icl_tasks.{i}") from None
    if cfg.load_path and "://" not in cfg.load_path and not Path(cfg.load_path).exists():
        raise ConfigError("load_path", f"checkpoint not found: {cfg.load_path}")
    if cfg.save_folder and probe_storage and dist.get_global_rank() == 0:
        check_save_folder(format_name_with_dist(cfg.save_folder, cfg.run_name or "run"))


def _check_local_data(key: str, loader: TextLoaderConfig) -> None:
    """Local MDS folders exist and hold samples long enough for the loader."""
    if loader.name == "synthetic":
        return
    ds = loader.dataset
    length = (f"{key}.dataset.max_seq_len", ds.max_seq_len)
    sources = {
        f"{key}.dataset.streams.{name}": (
            s.remote,
            s.local,
            s.split if s.split is not None else ds.split,
        )
        for name, s in (ds.streams or {}).items()
    } or {f"{key}.dataset": (ds.remote, ds.local, ds.split)}
    for src_key, (remote, local, split) in sources.items():
        if remote and "://" not in remote:
            _check_local_index(f"{src_key}.remote", remote, split, length)
        elif not remote and local:
            _check_local_index(f"{src_key}.local", local, split, length)


def _check_local_index(key: str, folder: str, split: str | None, length: tuple[str, int]) -> None:
    root = Path(folder) / split if split else Path(folder)
    if not (root / "index.json").is_file():
        raise ConfigError(
            key, f"no MDS dataset at {root} (index.json missing); run scripts/data_prep/convert.py"
        )
    samples = _sample_count(root / "index.json")
    if samples == 0:
        raise ConfigError(
            key,
            f"the split at {root} holds no samples (its index.json lists none): the corpus had "
            "no text, or too little for one sample; convert more text or a lower --concat-tokens",
        )
    if samples is None:
        raise ConfigError(key, f"{root / 'index.json'} is not a readable MDS index")
    len_key, seq_len = length
    stored = _sample_tokens(root / "index.json")
    if stored is not None and stored < seq_len:
        raise ConfigError(
            len_key,
            f"{seq_len} is longer than the {stored}-token samples of {root}: convert with "
            f"--concat-tokens >= {seq_len}, or train at max_seq_len <= {stored}",
        )


def _sample_count(index: Path) -> int | None:
    """Samples listed by an MDS index; None when it cannot be read as one."""
    try:
        shards = json.loads(index.read_text(encoding="utf-8"))["shards"]
        return sum(int(s["samples"]) for s in shards)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _sample_tokens(index: Path) -> int | None:
    """Tokens per sample of an mpt-convert dataset (its ``tokens`` column is a fixed-length
    ndarray, ``ndarray:uint16:2048``); None when the index does not say."""
    try:
        shard = json.loads(index.read_text(encoding="utf-8"))["shards"][0]
        encoding = shard["column_encodings"][shard["column_names"].index("tokens")]
        kind, _, length = encoding.split(":")
        return int(length) if kind == "ndarray" else None
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def check_save_folder(save_folder: str) -> None:
    """Prove the checkpoint location is writable now, not at the first save hours later."""
    probe = f".mpt-train-write-probe-{uuid.uuid4().hex[:8]}"
    if "://" not in save_folder:
        path = Path(save_folder)
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / probe).write_bytes(b"ok")
            (path / probe).unlink()
        except OSError as e:
            raise ConfigError("save_folder", f"cannot write to {path}: {e.strerror or e}") from None
        return
    from composer.utils import maybe_create_object_store_from_uri, parse_uri

    try:
        store = maybe_create_object_store_from_uri(save_folder)
        _, _, prefix = parse_uri(save_folder)
        key = f"{prefix.rstrip('/')}/{probe}".lstrip("/")
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / probe
        tmp.write_bytes(b"ok")
        try:
            store.upload_object(key, str(tmp))
        finally:
            tmp.unlink(missing_ok=True)
        client = getattr(store, "client", None)  # S3: leave no probe object behind
        if client is not None and hasattr(client, "delete_object"):
            client.delete_object(Bucket=store.bucket, Key=key)
    except Exception as e:
        raise ConfigError("save_folder", f"cannot write to {save_folder}: {e}") from None
    log.debug("save_folder %s is writable", save_folder)
