"""Loss and perplexity of a model on an eval set (MDS shards or a JSONL of texts).

Perplexity is ``exp`` of the token-weighted mean next-token cross-entropy over the whole set
(not a mean of per-batch perplexities, which over-weights short batches). The sequence length
may exceed the training length: ALiBi models extrapolate, which is how MPT-StoryWriter reads
65k-token books after training at 2k. A learned-position model cannot; that is refused up
front with the lengths involved, rather than failing inside the embedding lookup.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from mpt_train.data.text_dataset import sequence_ids
from mpt_train.errors import ConfigError
from mpt_train.model import MPTModel

__all__ = ["EvalSetConfig", "PerplexityResult", "check_eval_length", "evaluate_perplexity"]

log = logging.getLogger(__name__)


@dataclass
class EvalSetConfig:
    """One eval set: exactly one of ``mds`` (a converted dataset folder or URL) or ``jsonl``.

    Attributes:
        mds: MDS dataset root (local folder or ``s3://``), read through the streaming loader.
        split: Sub-folder of ``mds``.
        jsonl: JSONL file whose ``text_key`` holds one document per line; documents are
            joined with EOS and cut into ``max_seq_len`` windows, as pretraining data is.
        max_seq_len: Tokens per evaluated sequence (may exceed the training length: ALiBi).
        batch_size: Sequences per forward pass.
        max_batches: Stop after this many batches (-1: the whole set).
    """

    mds: str | None = None
    split: str = "val"
    jsonl: str | None = None
    text_key: str = "text"
    max_seq_len: int = 2048
    batch_size: int = 8
    max_batches: int = -1

    def __post_init__(self) -> None:
        if (self.mds is None) == (self.jsonl is None):
            raise ConfigError("mds", "give exactly one of 'mds' (a dataset) or 'jsonl' (a file)")
        if self.max_seq_len < 2 or self.batch_size < 1:
            raise ConfigError("max_seq_len", "max_seq_len must be >= 2 and batch_size >= 1")


@dataclass
class PerplexityResult:
    loss: float
    perplexity: float
    tokens: int


def check_eval_length(model: MPTModel, seq_len: int) -> None:
    """Refuse lengths a learned position table cannot index; ALiBi has no such limit."""
    cfg = model.cfg
    if cfg.learned_pos_emb and seq_len > cfg.max_seq_len:
        raise ValueError(
            f"eval sequence length {seq_len} exceeds the learned position embedding table "
            f"(model.max_seq_len {cfg.max_seq_len}); only ALiBi models extrapolate past the "
            "training length: evaluate at <= max_seq_len"
        )


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSONL file; a line that is not
    JSON fails naming ``path:line``. Lines split on newlines only (``str.splitlines`` also
    splits at U+2028 and the like, which JSON strings may hold raw)."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None


def _jsonl_batches(
    cfg: EvalSetConfig, tokenizer: PreTrainedTokenizerBase
) -> Iterator[torch.Tensor]:
    path = Path(cfg.jsonl or "")
    if not path.is_file():
        raise ConfigError("jsonl", f"eval file not found: {path}")
    stream: list[int] = []
    rows: list[list[int]] = []
    for lineno, rec in json_lines(path):
        text = rec.get(cfg.text_key) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: no string field {cfg.text_key!r}")
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        stream.append(tokenizer.eos_token_id)
        while len(stream) >= cfg.max_seq_len:
            rows.append(stream[: cfg.max_seq_len])
            stream = stream[cfg.max_seq_len :]
            if len(rows) == cfg.batch_size:
                yield torch.tensor(rows)
                rows = []
    if rows:
        yield torch.tensor(rows)
    if len(stream) > 1:
        yield torch.tensor([stream])  # the shorter tail is scored too


def _mds_batches(
    cfg: EvalSetConfig, tokenizer: PreTrainedTokenizerBase, vocab_size: int
) -> Iterable[torch.Tensor]:
    from mpt_train.data import build_text_dataloader
    from mpt_train.data.config import TextDatasetConfig, TextLoaderConfig

    local, remote = (None, cfg.mds) if "://" in str(cfg.mds) else (cfg.mds, None)
    loader = TextLoaderConfig(
        dataset=TextDatasetConfig(
            local=local,
            remote=remote,
            split=cfg.split,
            max_seq_len=cfg.max_seq_len,
            shuffle=False,
        ),
        drop_last=False,
        num_workers=0,
    )
    try:
        dl = build_text_dataloader(loader, tokenizer, cfg.batch_size, vocab_size=vocab_size)
    except ConfigError as err:
        raise ConfigError("mds", f"{cfg.mds}: {err}") from None
    return (b["input_ids"] for b in dl)


@torch.no_grad()
def evaluate_perplexity(
    model: MPTModel, cfg: EvalSetConfig, tokenizer: PreTrainedTokenizerBase
) -> PerplexityResult:
    """Token-weighted loss and perplexity of ``model`` over the eval set."""
    check_eval_length(model, cfg.max_seq_len)
    device = next(model.parameters()).device
    batches = (
        _mds_batches(cfg, tokenizer, model.cfg.vocab_size)
        if cfg.mds
        else _jsonl_batches(cfg, tokenizer)
    )
    total, count = 0.0, 0
    per_document = model.cfg.attn_config.attn_uses_sequence_id
    was_training = model.training
    model.eval()
    try:
        for i, ids_BS in enumerate(batches):
            if cfg.max_batches >= 0 and i >= cfg.max_batches:
                break
            ids_BS = ids_BS.to(device)
            # A model trained with document masks is scored as it trained (and as the
            # trainer's eval loaders score it): each document attends to itself only.
            seq_BS = sequence_ids(ids_BS, tokenizer.eos_token_id) if per_document else None
            logits_BSV = model(ids_BS, sequence_id=seq_BS).float()
            loss = F.cross_entropy(
                logits_BSV[:, :-1].flatten(0, 1), ids_BS[:, 1:].flatten(), reduction="sum"
            )
            total += float(loss)
            count += ids_BS[:, 1:].numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"eval set {cfg.mds or cfg.jsonl} produced no tokens to score")
    mean = total / count
    return PerplexityResult(loss=mean, perplexity=math.exp(min(mean, 700.0)), tokens=count)
