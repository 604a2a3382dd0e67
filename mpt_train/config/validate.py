"""Checks that need the world outside the spec: ranks, files, buckets.

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

_REMOTE_SCHEMES = ("s3://", "gs://", "oci://", "azure://", "hf://", "dbfs:/", "sftp://")


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
    """Everything a run needs from its environment, checked up front."""
    check_batch_split(cfg, world_size)
    if cfg.train_loader is not None:
        _check_loader("train_loader", cfg.train_loader, cfg, training=True)
    if cfg.finetune_loader is not None:
        _check_finetune(cfg)
    loaders = dict(cfg.eval_loaders)
    if cfg.eval_loader is not None:
        _check_loader("eval_loader", cfg.eval_loader, cfg, training=False)
    for label, loader in loaders.items():
        _check_loader(f"eval_loaders.{label}", loader, cfg, training=False)
    for i, task in enumerate(cfg.icl_tasks):
        try:
            task.resolved_path()
        except ConfigError as err:
            raise err.with_prefix(f"icl_tasks.{i}") from None
    if cfg.load_path and "://" not in cfg.load_path and not Path(cfg.load_path).exists():
        raise ConfigError("load_path", f"checkpoint not found: {cfg.load_path}")
    if cfg.save_folder and probe_storage and dist.get_global_rank() == 0:
        check_save_folder(format_name_with_dist(cfg.save_folder, cfg.run_name or "run"))


def _check_loader(key: str, loader: TextLoaderConfig, cfg: RunConfig, training: bool) -> None:
    ds = loader.dataset
    model_len = cfg.model.max_seq_len
    if ds.max_seq_len > model_len and (training or cfg.model.learned_pos_emb):
        why = "" if training else " (learned position embeddings cannot go past their table)"
        raise ConfigError(
            f"{key}.dataset.max_seq_len",
            f"{ds.max_seq_len} is above the model's max_seq_len {model_len}{why}",
        )
    if loader.name == "synthetic":
        if not training and cfg.eval_subset_num_batches <= 0:
            raise ConfigError(
                f"{key}.name",
                "a synthetic eval set never ends: set eval_subset_num_batches > 0 "
                "(or use a real eval set)",
            )
        return  # no sources to check: ids are generated in the training process
    if ds.streams:
        for name, stream in ds.streams.items():
            _check_source(
                f"{key}.dataset.streams.{name}",
                stream.remote,
                stream.local,
                stream.split if stream.split is not None else ds.split,
                (f"{key}.dataset.max_seq_len", ds.max_seq_len),
            )
    else:
        length = (f"{key}.dataset.max_seq_len", ds.max_seq_len)
        _check_source(f"{key}.dataset", ds.remote, ds.local, ds.split, length)


def _check_finetune(cfg: RunConfig) -> None:
    ds = cfg.finetune_loader.dataset
    if ds.max_seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            "finetune_loader.dataset.max_seq_len",
            f"{ds.max_seq_len} is above the model's max_seq_len {cfg.model.max_seq_len}",
        )
    if ds.packing and not cfg.model.attn_config.attn_uses_sequence_id:
        raise ConfigError(
            "finetune_loader.dataset.packing",
            "packed examples would attend to each other: set "
            "model.attn_config.attn_uses_sequence_id=true or packing=false",
        )
    if not Path(ds.path).is_file():
        raise ConfigError("finetune_loader.dataset.path", f"JSONL file not found: {ds.path}")


def _check_source(
    key: str, remote: str | None, local: str | None, split: str | None, length: tuple[str, int]
) -> None:
    """``length``: the key and value of the tokens per sample the loader will ask for."""
    if remote:
        if "://" in remote and not remote.startswith(_REMOTE_SCHEMES):
            raise ConfigError(
                f"{key}.remote",
                f"{remote!r}: unsupported scheme, expected one of {_REMOTE_SCHEMES}",
            )
        if "://" not in remote:
            _check_local_index(f"{key}.remote", remote, split, length)
        return
    if not local:
        raise ConfigError(key, "set 'local' (an MDS folder) or 'remote' (a URL) for the data")
    _check_local_index(f"{key}.local", local, split, length)


def _check_local_index(key: str, folder: str, split: str | None, length: tuple[str, int]) -> None:
    root = Path(folder) / split if split else Path(folder)
    if not (root / "index.json").is_file():
        raise ConfigError(
            key, f"no MDS dataset at {root} (index.json missing); run scripts/data_prep/convert.py"
        )
    len_key, seq_len = length
    stored = _sample_tokens(root / "index.json")
    if stored is not None and stored < seq_len:
        raise ConfigError(
            len_key,
            f"{seq_len} is longer than the {stored}-token samples of {root}: convert with "
            f"--concat-tokens >= {seq_len}, or train at max_seq_len <= {stored}",
        )


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
