"""Composer callbacks of mpt-train: accounting (cost, throughput, MFU) with restart-safe totals."""

from mpt_train.callbacks.cost_monitor import CostMonitor, CostTotals
from mpt_train.callbacks.speed_monitor import TrainSpeedMonitor, in_batch_eval_seconds

__all__ = ["CostMonitor", "CostTotals", "TrainSpeedMonitor", "in_batch_eval_seconds"]
