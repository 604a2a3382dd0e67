"""``make quickstart``: shipped corpus -> MDS shards -> a tiny MPT trained on CPU -> checkpoint.

Everything it needs ships with the package (corpus, tokenizer), so it runs offline on a fresh
machine. Running it again finds the data prepared and the run finished, and returns at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from composer import Trainer

from mpt_train.config import RunConfig, load_config
from mpt_train.data import SHIPPED_CORPUS
from mpt_train.data.convert import ConvertOptions, convert_corpus
from mpt_train.errors import run_cli
from mpt_train.loggers.jsonl import read_metrics
from mpt_train.train.builder import train

__all__ = ["main"]

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", nargs="?", default="yamls/quickstart.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    return run_cli(lambda: _run(args), prefix=f"error in run spec {args.spec}")


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.spec, args.overrides)
    t0 = time.monotonic()
    data = Path(cfg.train_loader.dataset.local or "data/quickstart")
    # stats.json is written last, once every split is complete.
    if not (data / "stats.json").is_file():
        log.info("preparing %s from the shipped corpus", data)
        convert_corpus(
            ConvertOptions(
                inputs=[SHIPPED_CORPUS],
                out=str(data),
                tokenizer=cfg.tokenizer.name,
                concat_tokens=cfg.train_loader.dataset.max_seq_len,
                val_fraction=0.02,
            )
        )
    t_data = time.monotonic() - t0
    trainer = train(cfg)
    _summary(cfg, trainer, data, time.monotonic() - t0, t_data)
    return 0


def _summary(cfg: RunConfig, trainer: Trainer, data: Path, wall: float, t_data: float) -> None:
    """What the run did and where its outputs are."""
    run_name = trainer.state.run_name  # generated when the spec names none
    metrics = Path(cfg.loggers.jsonl.path.format(run_name=run_name)) if cfg.loggers.jsonl else None
    rows = read_metrics(metrics) if metrics and metrics.is_file() else []
    losses = [r["loss/train/total"] for r in rows if "loss/train/total" in r]
    evals = [
        r["metrics/eval/LanguageCrossEntropy"]
        for r in rows
        if "metrics/eval/LanguageCrossEntropy" in r
    ]
    print("\nquickstart done")
    print(f"  wall time      {wall:.0f} s (data prep {t_data:.0f} s)")
    print(f"  batches        {int(trainer.state.timestamp.batch)}")
    if losses:
        print(f"  train loss     {losses[0]:.3f} (first logged) -> {losses[-1]:.3f} (last)")
    if evals:
        print(f"  eval loss      {evals[-1]:.3f}")
    print(f"  data           {data}/{{train,val}}")
    print(
        f"  checkpoints    {cfg.save_folder.format(run_name=run_name) if cfg.save_folder else '-'}"
    )
    print(f"  metrics        {metrics}")
    print(f"  spec           runs/{run_name}/config.yaml")


if __name__ == "__main__":
    sys.exit(main())
