"""The data step of a run: the tokenizer, the training loader and the evaluators, as Composer
DataSpecs that count tokens without waiting on the device."""

from __future__ import annotations

from typing import Any

from composer import Evaluator
from composer.core import DataSpec

from mpt_train.config import RunConfig
from mpt_train.data import build_text_dataloader, load_tokenizer
from mpt_train.data.config import TextLoaderConfig
from mpt_train.data.finetune import FinetuneLoaderConfig, build_finetune_dataloader
from mpt_train.data.synthetic import build_synthetic_dataloader
from mpt_train.errors import ConfigError
from mpt_train.train.composer_model import IGNORE_INDEX, shift_labels

__all__ = ["build_data", "load_run_tokenizer", "pretrain_token_counts", "token_counts"]


def token_counts(batch: dict[str, Any]) -> dict[str, int]:
    """Tokens of a batch: ``total`` for throughput, ``loss_generating`` to weight microbatches.

    Padding (``sequence_id`` -1 in fine-tuning batches) is not data. Weighting microbatches by
    the tokens that carry loss (not by samples) makes a fine-tune's gradient the mean over all
    response tokens of the global batch, whatever the microbatch size or number of ranks.
    """
    seq_id = batch.get("sequence_id")
    total = int((seq_id >= 0).sum()) if seq_id is not None else int(batch["input_ids"].numel())
    return {"total": total, "loss_generating": int((shift_labels(batch) != IGNORE_INDEX).sum())}


def pretrain_token_counts(batch: dict[str, Any]) -> dict[str, int]:
    """:func:`token_counts` of a pretraining batch, read off its shape.

    Text and synthetic batches are all data, and every position but the last has a target.
    Counting from shapes keeps each microbatch from waiting on a device-to-host copy (Composer
    asks for these counts at every microbatch, before its forward pass).
    """
    bsz, seq_len = batch["input_ids"].shape[:2]
    return {"total": bsz * seq_len, "loss_generating": bsz * (seq_len - 1)}


def _dataloader(
    loader: TextLoaderConfig, tokenizer: Any, batch_size: int, seq_id: bool, vocab_size: int
) -> DataSpec:
    if loader.name == "synthetic":
        dl = build_synthetic_dataloader(loader, vocab_size, batch_size, emit_sequence_id=seq_id)
    else:
        dl = build_text_dataloader(
            loader, tokenizer, batch_size, emit_sequence_id=seq_id, vocab_size=vocab_size
        )
    return DataSpec(dl, get_num_tokens_in_batch=pretrain_token_counts)


def needs_tokenizer(cfg: RunConfig) -> bool:
    """Real data and ICL need the tokenizer; synthetic batches do not (nothing to download)."""
    loaders = [cfg.train_loader, cfg.eval_loader, *cfg.eval_loaders.values()]
    real = any(lo is not None and lo.name != "synthetic" for lo in loaders)
    return real or cfg.finetune_loader is not None or bool(cfg.icl_tasks)


def _finetune_dataloader(loader: FinetuneLoaderConfig, tokenizer: Any, batch_size: int) -> DataSpec:
    try:
        dl = build_finetune_dataloader(loader, tokenizer, batch_size)
    except ConfigError as err:
        raise err.with_prefix("finetune_loader") from None
    return DataSpec(dl, get_num_tokens_in_batch=token_counts)


def load_run_tokenizer(cfg: RunConfig) -> Any:
    """The spec's tokenizer, or None when no part of the run reads text."""
    if not needs_tokenizer(cfg):
        return None
    try:
        tokenizer = load_tokenizer(cfg.tokenizer.name, **cfg.tokenizer.kwargs)
    except ConfigError as err:
        raise err.with_prefix("tokenizer") from None
    if len(tokenizer) > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{cfg.model.vocab_size} is smaller than tokenizer {cfg.tokenizer.name!r} "
            f"({len(tokenizer)} ids); token ids past the table would fail on the first step",
        )
    return tokenizer


def build_data(cfg: RunConfig, tokenizer: Any, per_rank: int) -> tuple[DataSpec, list[Evaluator]]:
    """The training DataSpec (``per_rank`` samples a batch) and one Evaluator per eval set."""
    seq_id = cfg.model.attn_config.attn_uses_sequence_id
    vocab = cfg.model.vocab_size
    if cfg.finetune_loader is not None:
        train_dl = _finetune_dataloader(cfg.finetune_loader, tokenizer, per_rank)
    else:
        train_dl = _dataloader(cfg.train_loader, tokenizer, per_rank, seq_id, vocab)
    eval_loaders = dict(cfg.eval_loaders)
    if cfg.eval_loader is not None:
        eval_loaders = {"eval": cfg.eval_loader, **eval_loaders}
    evaluators = [
        Evaluator(
            label=label,
            dataloader=_dataloader(loader, tokenizer, cfg.device_eval_batch_size, seq_id, vocab),
            metric_names=["LanguageCrossEntropy", "LanguagePerplexity"],
        )
        for label, loader in eval_loaders.items()
    ]
    return train_dl, evaluators
