"""MPT as a Composer model: next-token loss, LM metrics and FLOPs for MFU.

The network itself (:class:`mpt_train.model.MPTModel`) stays single-device and free of
training concerns; this wrapper is what Composer's Trainer drives. The network is kept as one
child (``self.model``) because Composer's FSDP2 shards the direct children of the
ComposerModel; blocks are picked inside it by ``fsdp_wrap_fn`` (set in the trainer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torchmetrics import Metric

from mpt_train.model import MPTModel

__all__ = ["IGNORE_INDEX", "ComposerMPT", "shift_labels"]

IGNORE_INDEX = -100


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
    """Wraps an :class:`MPTModel` for Composer's Trainer."""

    def __init__(self, model: MPTModel) -> None:
        super().__init__()
        self.model = model
        self.use_sequence_id = model.cfg.attn_config.attn_uses_sequence_id
        self.train_metrics = {
            "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX)
        }
        self.eval_metrics = {
            "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
            "LanguagePerplexity": LanguagePerplexity(ignore_index=IGNORE_INDEX),
        }

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        sequence_id = batch.get("sequence_id") if self.use_sequence_id else None
        return self.model(batch["input_ids"], sequence_id=sequence_id)

    def loss(self, outputs: torch.Tensor, batch: dict[str, Any], *args, **kwargs) -> torch.Tensor:
        targets = shift_labels(batch)
        return F.cross_entropy(
            outputs.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
        )

    def eval_forward(self, batch: dict[str, Any], outputs: Any | None = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: dict[str, Any], outputs: torch.Tensor, metric: Metric) -> None:
        metric.update(outputs, shift_labels(batch))

    def flops_per_batch(self, batch: dict[str, Any]) -> float:
        """Model FLOPs of one training step on ``batch`` (llm-foundry's MFU convention)."""
        bsz, seq_len = batch["input_ids"].shape[:2]
        return float(self.model.flops_per_batch(bsz, seq_len))
