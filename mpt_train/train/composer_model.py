"""MPT as a Composer model: next-token loss, LM metrics and FLOPs for MFU.

The network itself (:class:`mpt_train.model.MPTModel`) stays single-device and free of
training concerns; this wrapper is what Composer's Trainer drives. The network is kept as one
child (``self.model``) because Composer's FSDP2 shards the direct children of the
ComposerModel; blocks are picked inside it by ``fsdp_wrap_fn`` (set in the trainer).

Training computes the loss inside the network's forward (``targets=``), optionally in chunks,
and by default no per-step train metrics: ``loss/train/total`` is already the cross-entropy, and
a train metric would run a second softmax over the full logits and an all-reduce every step.
"""

from __future__ import annotations

from typing import Any

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torchmetrics import Metric

from mpt_train.errors import RunFailure
from mpt_train.model import MPTModel
from mpt_train.model.loss import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "ComposerMPT", "WeightsMismatchError", "shift_labels"]


class WeightsMismatchError(RunFailure):
    """A checkpoint's tensors are not the model's: the message names the first few of each."""


def shift_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Targets aligned with logits: position i predicts token i+1.

    A batch may carry ``labels`` (fine-tuning masks prompt tokens with -100); otherwise they are
    the inputs. The last position has nothing to predict.
    """
    labels = batch.get("labels", batch["input_ids"])
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


class ComposerMPT(ComposerModel):
    """Wraps an :class:`MPTModel` for Composer's Trainer.

    Args:
        model: the network.
        loss_chunk_tokens: 0 computes the loss from full logits; N > 0 computes head and
            cross-entropy N tokens at a time (activation memory of one chunk's logits only).
        train_metrics: also compute ``metrics/train/LanguageCrossEntropy`` every step.
    """

    def __init__(
        self, model: MPTModel, loss_chunk_tokens: int = 0, train_metrics: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_chunk_tokens = loss_chunk_tokens
        self.use_sequence_id = model.cfg.attn_config.attn_uses_sequence_id
        self.train_metrics = (
            {"LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX)}
            if train_metrics
            else {}
        )
        self.eval_metrics = {
            "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
            "LanguagePerplexity": LanguagePerplexity(ignore_index=IGNORE_INDEX),
        }

    #: Load weights strictly even when Composer asks for less: it resumes a full checkpoint
    #: with ``strict=False``, which would continue a changed model from whatever tensors happen
    #: to fit. The trainer clears it only for a ``load_path`` with
    #: ``load_strict_model_weights: false``.
    strict_loading: bool = True

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        strict = strict or self.strict_loading
        if strict:
            _check_same_tensors(self.state_dict(), state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _sequence_id(self, batch: dict[str, Any]) -> torch.Tensor | None:
        return batch.get("sequence_id") if self.use_sequence_id else None

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Training forward: the mean next-token loss (logits when train metrics need them)."""
        if self.train_metrics:
            return self.model(batch["input_ids"], sequence_id=self._sequence_id(batch))
        return self.model(
            batch["input_ids"],
            sequence_id=self._sequence_id(batch),
            targets=shift_labels(batch),
            loss_chunk_tokens=self.loss_chunk_tokens,
        )

    def loss(self, outputs: torch.Tensor, batch: dict[str, Any], *args, **kwargs) -> torch.Tensor:
        if outputs.ndim == 0:
            return outputs
        targets = shift_labels(batch)
        return torch.nn.functional.cross_entropy(
            outputs.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
        )

    def eval_forward(self, batch: dict[str, Any], outputs: Any | None = None) -> torch.Tensor:
        if outputs is not None and outputs.ndim == 3:
            return outputs
        return self.model(batch["input_ids"], sequence_id=self._sequence_id(batch))

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: dict[str, Any], outputs: torch.Tensor, metric: Metric) -> None:
        metric.update(outputs, shift_labels(batch))

    def flops_per_batch(self, batch: dict[str, Any]) -> float:
        """Model FLOPs of one training step on ``batch`` (llm-foundry's MFU convention)."""
        bsz, seq_len = batch["input_ids"].shape[:2]
        return float(self.model.flops_per_batch(bsz, seq_len))


def _check_same_tensors(own: dict[str, Any], loaded: dict[str, Any]) -> None:
    """One line naming what is missing, unexpected or of another shape (at most 3 of each)."""

    def some(names: list[str]) -> str:
        more = f", ... ({len(names)} in all)" if len(names) > 3 else ""
        return ", ".join(names[:3]) + more

    missing = sorted(set(own) - set(loaded))
    unexpected = sorted(set(loaded) - set(own))
    shapes = [
        f"{k} {tuple(loaded[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(loaded))
        if hasattr(own[k], "shape")
        and hasattr(loaded[k], "shape")
        and tuple(own[k].shape) != tuple(loaded[k].shape)
    ]
    problems = [
        f"{what}: {some(names)}"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if names
    ]
    if problems:
        raise WeightsMismatchError(
            "the checkpoint's weights are not this model's (" + "; ".join(problems) + ")"
        )
