"""Eval loaders score every validation sample; training loaders keep full batches only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from streaming import MDSWriter

from mpt_train.config import load_config_dict
from mpt_train.data.config import EvalLoaderConfig, TextDatasetConfig, TextLoaderConfig
from mpt_train.data.dataloader import build_text_dataloader
from mpt_train.train.builder import build_trainer
from tests.train.conftest import SEQ, tiny_spec

# Streaming runs background threads; a hang must fail the test, not the CI job.
pytestmark = pytest.mark.timeout(300)

N_VAL = 23  # not a multiple of the eval batch (8): the last batch holds 7 samples


def _write_split(root: Path, split: str, n: int) -> None:
    """``n`` samples of SEQ tokens; the second token is the sample's index."""
    rng = np.random.default_rng(n)
    with MDSWriter(
        out=str(root / split), columns={"tokens": f"ndarray:uint16:{SEQ}"}, size_limit=1 << 12
    ) as writer:
        for i in range(n):
            row = rng.integers(2, 8000, SEQ, dtype=np.uint16)
            row[1] = i
            writer.write({"tokens": row})


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "mds"
    _write_split(root, "train", 16)
    _write_split(root, "val", N_VAL)
    return root


def _batch_sizes(cfg: TextLoaderConfig) -> tuple[list[int], list[int]]:
    """Batch sizes and the sample indices seen, over one pass of the loader."""
    batches = list(build_text_dataloader(cfg, None, 8))
    return [len(b["input_ids"]) for b in batches], [
        int(i) for b in batches for i in b["input_ids"][:, 1]
    ]


def test_eval_sections_keep_the_partial_last_batch(data: Path) -> None:
    dataset = {"local": str(data), "split": "val", "max_seq_len": SEQ, "shuffle": False}
    sizes, seen = _batch_sizes(
        EvalLoaderConfig(dataset=TextDatasetConfig(**dataset), num_workers=0)
    )
    assert sizes == [8, 8, 7] and sorted(seen) == list(range(N_VAL))
    # Training sections still drop it: every step has the same shape.
    sizes, _ = _batch_sizes(TextLoaderConfig(dataset=TextDatasetConfig(**dataset), num_workers=0))
    assert sizes == [8, 8]


@pytest.mark.parametrize("compile_cfg", [None, {"enabled": True, "backend": "aot_eager"}])
def test_training_eval_scores_every_sample(
    compile_cfg: dict | None, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's eval covers all N_VAL samples, and its loss is their mean token loss.

    Compiled blocks see the smaller last batch as one more shape; it must score like eager.
    """
    monkeypatch.chdir(tmp_path)
    top = {"compile": compile_cfg} if compile_cfg else {}
    spec = tiny_spec(data, max_duration="4ba", device_eval_batch_size=8, **top)
    spec["eval_loader"] = {
        "dataset": {"local": str(data), "split": "val", "max_seq_len": SEQ, "shuffle": False},
        "num_workers": 0,
    }
    trainer = build_trainer(load_config_dict(spec))
    trainer.eval()
    metric = trainer.state.eval_metrics["eval"]["LanguageCrossEntropy"]
    assert int(metric.total_items) == N_VAL * (SEQ - 1)

    rows = [b["input_ids"] for b in build_text_dataloader(
        EvalLoaderConfig(
            dataset=TextDatasetConfig(local=str(data), split="val", max_seq_len=SEQ, shuffle=False),
            num_workers=0,
        ),
        None,
        N_VAL,
    )]  # fmt: skip
    ids = torch.cat(rows)
    assert ids.shape == (N_VAL, SEQ)
    net = trainer.state.model.model.eval()
    with torch.no_grad():
        logits = net(ids)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(metric.compute(), expected, rtol=1e-5, atol=1e-5)
    trainer.close()
