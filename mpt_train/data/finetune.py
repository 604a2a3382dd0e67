"""Instruction and chat fine-tuning data: JSONL -> tokenized examples -> (packed) batches.

Fine-tuning teaches the model to *answer*, so only response tokens carry loss: prompt tokens
get label ``-100`` (``IGNORE_INDEX``), which :class:`~mpt_train.train.composer_model.ComposerMPT`
skips. Two record shapes are read from JSONL:

* ``{"prompt": ..., "response": ...}`` (MPT-7B-Instruct's dolly/HH-RLHF format);
* ``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered in ChatML
  (``<|im_start|>role\\ncontent<|im_end|>\\n``), as MPT-7B-Chat was trained; every assistant
  turn (its content and closing ``<|im_end|>``) is a response, everything else is prompt.

Short examples are packed into rows of ``max_seq_len`` (first-fit, decreasing length) with a
``sequence_id`` per example, so no compute goes to padding; the model must then mask attention
across examples (``attn_config.attn_uses_sequence_id``), which the trainer checks. Padding has
label -100 and its own sequence id (-1), so it is never attended to by real tokens.

Packing orders rows from longest to shortest, so with ``shuffle`` the packed rows are shuffled
again and the loader draws a new permutation every epoch (a ``DistributedSampler`` seeded with
``shuffle_seed``, whose epoch Composer sets): batches do not follow a length curriculum, and the
order is a function of seed and epoch alone, so a resumed run skips to the same batches.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from mpt_train.errors import ConfigError

__all__ = [
    "IGNORE_INDEX",
    "FinetuneCollator",
    "FinetuneDataset",
    "FinetuneDatasetConfig",
    "FinetuneLoaderConfig",
    "build_finetune_dataloader",
    "pack_examples",
    "render_chatml",
    "tokenize_example",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PAD_SEQUENCE_ID = -1
FORMATS = ("auto", "prompt_response", "chat")


@dataclass
class FinetuneDatasetConfig:
    """Where the JSONL lives and how examples become rows.

    Attributes:
        path: Local JSONL file (one example per line).
        format: ``prompt_response``, ``chat`` or ``auto`` (decided per record by its keys).
        max_seq_len: Tokens per row; longer examples are truncated (response cut at the end),
            examples whose prompt alone fills the row are skipped (they would carry no loss).
        packing: Pack several examples per row (needs ``attn_uses_sequence_id`` in the model).
        shuffle: Shuffle examples before packing, the packed rows after it, and the row order
            every epoch, all from ``shuffle_seed``.
        add_eos: Append EOS after each response so the model learns to stop.
    """

    path: str = ""
    format: str = "auto"
    max_seq_len: int = 2048
    packing: bool = True
    shuffle: bool = True
    shuffle_seed: int = 17
    add_eos: bool = True

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError("format", f"got {self.format!r}, allowed values: {FORMATS}")
        if self.max_seq_len < 2:
            raise ConfigError("max_seq_len", f"got {self.max_seq_len}, must be >= 2")


@dataclass
class FinetuneLoaderConfig:
    """The ``finetune_loader`` section (used instead of ``train_loader``)."""

    dataset: FinetuneDatasetConfig = field(default_factory=FinetuneDatasetConfig)
    drop_last: bool = True
    num_workers: int = 0


def render_chatml(messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    """ChatML segments ``(text, is_response)``: assistant content + ``<|im_end|>`` are responses.

    Each assistant turn's ``<|im_start|>assistant\\n`` header is prompt (the model is cued with
    it at inference), its content and ``<|im_end|>`` are response.
    """
    segments: list[tuple[str, bool]] = []
    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"message {i}: needs string 'role' and 'content', got {msg!r}")
        header = f"<|im_start|>{role}\n"
        if role == "assistant":
            segments += [(header, False), (content + "<|im_end|>", True), ("\n", False)]
        else:
            segments.append((header + content + "<|im_end|>\n", False))
    return segments


def _segments(record: dict[str, Any], fmt: str) -> list[tuple[str, bool]]:
    if fmt == "auto":
        fmt = "chat" if "messages" in record else "prompt_response"
    if fmt == "chat":
        if not isinstance(record.get("messages"), list):
            raise ValueError("chat record needs a 'messages' list")
        return render_chatml(record["messages"])
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError("prompt_response record needs string 'prompt' and 'response'")
    return [(prompt, False), (response, True)]


def tokenize_example(
    segments: Iterable[tuple[str, bool]], tokenizer: PreTrainedTokenizerBase, add_eos: bool
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` with labels ``-100`` on prompt tokens.

    Segments are tokenized separately and concatenated, so the prompt/response boundary is
    exact (no token straddles it), as llm-foundry does.
    """
    segments = list(segments)
    ids: list[int] = []
    labels: list[int] = []
    for text, is_response in segments:
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += toks
        labels += toks if is_response else [IGNORE_INDEX] * len(toks)
    if add_eos and tokenizer.eos_token_id is not None:
        # EOS is learned where a response ends the example; after a closing user turn (a
        # conversation cut short) the model must not learn to stop instead of answering.
        ends_in_response = next((resp for text, resp in reversed(segments) if text.strip()), False)
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if ends_in_response else IGNORE_INDEX)
    return ids, labels


def pack_examples(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """First-fit decreasing bin packing: groups of example indices, each summing <= max_len."""
    bins: list[list[int]] = []
    room: list[int] = []
    for idx in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[idx]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(idx)
                room[b] -= n
                break
        else:
            bins.append([idx])
            room.append(max_len - n)
    return bins


class FinetuneDataset(Dataset):
    """Rows ``{'input_ids', 'labels', 'sequence_id'}`` (unpadded) from a fine-tuning JSONL."""

    def __init__(self, cfg: FinetuneDatasetConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        path = Path(cfg.path)
        if not path.is_file():
            raise ConfigError("path", f"fine-tuning JSONL not found: {path}")
        examples: list[tuple[list[int], list[int]]] = []
        skipped = truncated = 0
        with path.open() as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    ids, labels = tokenize_example(
                        _segments(record, cfg.format), tokenizer, cfg.add_eos
                    )
                except (ValueError, AttributeError) as err:
                    raise ValueError(f"{path}:{lineno}: {err}") from None
                if len(ids) > cfg.max_seq_len:
                    ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
                    truncated += 1
                if all(lab == IGNORE_INDEX for lab in labels[1:]):
                    skipped += 1  # nothing to learn: the prompt fills the row
                    continue
                examples.append((ids, labels))
        if not examples:
            raise ValueError(f"{path}: no usable examples (skipped {skipped})")
        if truncated or skipped:
            log.warning("%s: truncated %d, skipped %d examples", path, truncated, skipped)
        rng = random.Random(cfg.shuffle_seed)
        if cfg.shuffle:
            rng.shuffle(examples)
        groups = (
            pack_examples([len(e[0]) for e in examples], cfg.max_seq_len)
            if cfg.packing
            else [[i] for i in range(len(examples))]
        )
        if cfg.shuffle:
            rng.shuffle(groups)  # packing sorted them longest first
        self.rows = [self._row([examples[i] for i in g]) for g in groups]
        n_tok = sum(len(e[0]) for e in examples)
        log.info(
            "%s: %d examples, %d tokens, %d rows of %d (%.0f%% filled)",
            path,
            len(examples),
            n_tok,
            len(self.rows),
            cfg.max_seq_len,
            100 * n_tok / (len(self.rows) * cfg.max_seq_len),
        )

    @staticmethod
    def _row(parts: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        labels: list[int] = []
        seq: list[int] = []
        for doc, (i, lab) in enumerate(parts):
            ids += i
            # An example's first token has no context in its example; packed after another, it
            # would be that one's last target, across the document mask.
            labels += [IGNORE_INDEX, *lab[1:]]
            seq += [doc] * len(i)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "sequence_id": torch.tensor(seq, dtype=torch.long),
        }

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.rows[idx]


class FinetuneCollator:
    """Right-pad rows to ``pad_to`` (or the batch's longest): pad id, label -100, sequence -1."""

    def __init__(self, pad_token_id: int, pad_to: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = self.pad_to or max(len(r["input_ids"]) for r in rows)
        fills = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        fills["sequence_id"] = PAD_SEQUENCE_ID
        batch = {}
        for key, fill in fills.items():
            out = torch.full((len(rows), length), fill, dtype=torch.long)
            for b, row in enumerate(rows):
                out[b, : len(row[key])] = row[key][:length]
            batch[key] = out
        return batch


def build_finetune_dataloader(
    cfg: FinetuneLoaderConfig, tokenizer: PreTrainedTokenizerBase, device_batch_size: int
) -> DataLoader:
    """A DataLoader of fixed-shape ``[B, max_seq_len]`` batches (shapes stay static for compile).

    The sampler is a ``DistributedSampler`` on any number of ranks: with ``dataset.shuffle`` it
    permutes the rows anew each epoch from ``shuffle_seed`` and the epoch number, which
    Composer's trainer passes to ``set_epoch`` before each epoch (and again when resuming).

    Raises:
        ConfigError: missing file (key ``dataset.path``).
    """
    try:
        dataset = FinetuneDataset(cfg.dataset, tokenizer)
    except ConfigError as err:
        raise err.with_prefix("dataset") from None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    from composer.utils import dist

    sampler = dist.get_sampler(
        dataset,
        shuffle=cfg.dataset.shuffle,
        drop_last=cfg.drop_last,
        seed=cfg.dataset.shuffle_seed,
    )
    return DataLoader(
        dataset,
        batch_size=device_batch_size,
        sampler=sampler,
        drop_last=cfg.drop_last,
        num_workers=cfg.num_workers,
        collate_fn=FinetuneCollator(pad, cfg.dataset.max_seq_len),
    )
