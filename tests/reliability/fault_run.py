"""``train.py`` with faults: ``[composer -n N] fault_run.py [--kill-at B R] [--kill-during-save B]
[--kill-before-manifest B]
[--kill-node-at B NODE STAMP] [--sleep-at B RANK SECONDS] [--ledger PREFIX] SPEC [a.b=c ...]``. Real processes die for real (SIGKILL)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mpt_train.cli import setup_logging
from mpt_train.config import load_config
from mpt_train.train.builder import build_trainer
from tests.reliability.faults import (
    KillAtBatch,
    KillNodeAtBatch,
    SampleLedger,
    SleepAtBatch,
    kill_before_manifest,
    kill_during_save,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-at", nargs=2, type=int, metavar=("BATCH", "RANK"))
    parser.add_argument("--kill-during-save", type=int, metavar="BATCH")
    parser.add_argument("--kill-before-manifest", type=int, metavar="BATCH")
    parser.add_argument("--kill-node-at", nargs=3, metavar=("BATCH", "NODE", "STAMP"))
    parser.add_argument("--sleep-at", nargs=3, type=float, metavar=("BATCH", "RANK", "SECONDS"))
    parser.add_argument("--ledger")
    parser.add_argument("spec")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    setup_logging()
    callbacks = []
    if args.ledger:
        callbacks.append(SampleLedger(args.ledger))
    if args.kill_at:
        callbacks.append(KillAtBatch(*args.kill_at))
    if args.kill_node_at:
        batch, node, stamp = args.kill_node_at
        callbacks.append(KillNodeAtBatch(int(batch), int(node), stamp))
    if args.sleep_at:
        batch, rank, seconds = args.sleep_at
        callbacks.append(SleepAtBatch(int(batch), int(rank), seconds))
    if args.kill_during_save:
        kill_during_save(args.kill_during_save)
    if args.kill_before_manifest:
        kill_before_manifest(args.kill_before_manifest)
    trainer = build_trainer(load_config(args.spec, args.overrides), extra_callbacks=callbacks)
    try:
        trainer.fit()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
