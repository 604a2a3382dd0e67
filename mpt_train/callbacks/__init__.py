"""Composer callbacks of mpt-train: accounting (cost, throughput, MFU) with restart-safe totals."""

from mpt_train.callbacks.cost_monitor import CostMonitor, CostTotals

__all__ = ["CostMonitor", "CostTotals"]
