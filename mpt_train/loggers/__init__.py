"""Where metrics go: a JSONL file per run and compact console lines (rank 0 only)."""

from mpt_train.loggers.console import ConsoleLine
from mpt_train.loggers.jsonl import JsonlLogger

__all__ = ["ConsoleLine", "JsonlLogger"]
