"""Build the training/eval DataLoader from a :class:`TextLoaderConfig` section.

The builder takes only its own section (plus the tokenizer, for the EOS id, and the
per-device batch size, which streaming needs to partition samples so that resumption lands on
the very next batch). It returns a plain ``torch.utils.data.DataLoader`` whose ``dataset`` is a
:class:`StreamingTextDataset`; Composer finds it there and saves/restores its
``state_dict`` in checkpoints.

Local-only datasets are checked before streaming sees them, because streaming's own message for
a missing folder ("No `remote` provided, but local file ... does not exist either") does not say
which key of the run spec to fix.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from streaming import Stream
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from mpt_train.data.config import TextDatasetConfig, TextLoaderConfig
from mpt_train.data.text_dataset import StreamingTextDataset
from mpt_train.errors import ConfigError

__all__ = ["build_text_dataloader", "build_text_dataset"]

log = logging.getLogger(__name__)


def _check_local(key: str, local: str | None, split: str | None) -> None:
    """A local-only stream must point at a converted dataset; say which key when it does not."""
    if local is None:
        return
    if not os.path.isdir(local):
        raise ConfigError(key, f"folder {local} does not exist (and no `remote` to download from)")
    index = os.path.join(local, split or "", "index.json")
    if not os.path.isfile(index):
        raise ConfigError(
            key,
            f"{index} not found: not a converted dataset, a wrong split, or an unfinished "
            "conversion (re-run mpt-convert to finish it)",
        )


def _streams(cfg: TextDatasetConfig) -> list[Stream] | None:
    if cfg.streams is None:
        if cfg.remote is None:
            _check_local("local", cfg.local, cfg.split)
        return None
    streams = []
    for name, sc in cfg.streams.items():
        if sc.remote is None:
            _check_local(f"streams.{name}.local", sc.local, sc.split or cfg.split)
        streams.append(
            Stream(
                remote=sc.remote,
                local=sc.local,
                split=sc.split,
                proportion=sc.proportion,
                repeat=sc.repeat,
                choose=sc.choose,
            )
        )
    return streams


def build_text_dataset(
    cfg: TextDatasetConfig,
    device_batch_size: int,
    eos_token_id: int | None = None,
    emit_sequence_id: bool = False,
    vocab_size: int | None = None,
) -> StreamingTextDataset:
    """A :class:`StreamingTextDataset` from a dataset section.

    Raises:
        ConfigError: no source, or a local-only source that is not a converted dataset
            (key relative to the dataset section, e.g. ``local``).
        DataReadError: a remote index cannot be fetched (names the URL).
    """
    cfg.check_sources()
    streams = _streams(cfg)
    kwargs: dict[str, Any] = {
        "streams": streams,
        "remote": cfg.remote if streams is None else None,
        "local": cfg.local if streams is None else None,
        "split": cfg.split,
        # Streaming documents `download_retry` as re-attempts but passes it on as the number
        # of attempts (0 would never try); this section's key means re-attempts.
        "download_retry": cfg.download_retry + 1,
        "download_timeout": cfg.download_timeout,
        "validate_hash": cfg.validate_hash,
        "keep_zip": cfg.keep_zip,
        "epoch_size": cfg.epoch_size,
        "predownload": cfg.predownload,
        "cache_limit": cfg.cache_limit,
        "partition_algo": cfg.partition_algo,
        "num_canonical_nodes": cfg.num_canonical_nodes,
        "batch_size": device_batch_size,
        "shuffle": cfg.shuffle,
        "shuffle_algo": cfg.shuffle_algo,
        "shuffle_seed": cfg.shuffle_seed,
        "shuffle_block_size": cfg.shuffle_block_size,
        "sampling_method": cfg.sampling_method,
        "sampling_granularity": cfg.sampling_granularity,
        "batching_method": cfg.batching_method,
    }
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else eos_token_id
    return StreamingTextDataset(
        max_seq_len=cfg.max_seq_len,
        emit_sequence_id=emit_sequence_id,
        eos_token_id=eos,
        vocab_size=vocab_size,
        **kwargs,
    )


def build_text_dataloader(
    cfg: TextLoaderConfig,
    tokenizer: PreTrainedTokenizerBase | None,
    device_batch_size: int,
    emit_sequence_id: bool = False,
    vocab_size: int | None = None,
) -> DataLoader:
    """The DataLoader Composer's Trainer consumes (batches of ``input_ids`` [B, max_seq_len]).

    Args:
        cfg: The loader section.
        tokenizer: Supplies the EOS id for ``sequence_id`` unless the section sets
            ``dataset.eos_token_id``; may be ``None`` when neither is needed.
        device_batch_size: Samples per batch on this rank.
        emit_sequence_id: Add ``sequence_id`` [B, max_seq_len] (document index per token).
        vocab_size: The model's vocabulary: a token id at or past it (a corrupt shard, or data
            tokenized for another vocabulary) fails naming the shard, before it reaches the
            embedding (on a GPU, an opaque device-side assert).

    With ``num_workers=0`` the worker-only options (``prefetch_factor``,
    ``persistent_workers``, ``timeout``) are not passed: torch rejects them there.
    """
    if device_batch_size < 1:
        raise ValueError(f"device_batch_size must be >= 1, got {device_batch_size}")
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    if emit_sequence_id and cfg.dataset.eos_token_id is None and eos is None:
        raise ConfigError("dataset.eos_token_id", "needed for sequence_id (no tokenizer given)")
    try:
        dataset = build_text_dataset(
            cfg.dataset, device_batch_size, eos, emit_sequence_id, vocab_size
        )
    except ConfigError as err:
        raise err.with_prefix("dataset") from None
    workers = cfg.num_workers
    pin = cfg.pin_memory and torch.cuda.is_available()  # pinning without a GPU only warns
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {
            "prefetch_factor": cfg.prefetch_factor,
            "persistent_workers": cfg.persistent_workers,
            "timeout": cfg.timeout,
        }
    log.debug("text dataloader: batch %d, %d workers", device_batch_size, workers)
    return DataLoader(
        dataset,
        batch_size=device_batch_size,
        drop_last=cfg.drop_last,
        num_workers=workers,
        pin_memory=pin,
        **extra,
    )
