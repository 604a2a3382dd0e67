"""Which loggers and callbacks a run gets from its ``loggers``, ``callbacks`` and ``cost``
sections: metrics, MFU and cost monitors with one peak FLOP/s for both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from composer.callbacks import LRMonitor, MemoryMonitor, RuntimeEstimator
from composer.core import Callback
from composer.loggers import LoggerDestination, WandBLogger

from mpt_train.callbacks import CostMonitor, TrainSpeedMonitor
from mpt_train.callbacks.accounting import detect_gpu_type, get_gpu
from mpt_train.config import RunConfig, redact, to_container
from mpt_train.loggers import ConsoleLine, JsonlLogger
from mpt_train.reliability.records import RunRecords
from mpt_train.train.trainer import RunSpecRecorder

__all__ = ["build_callbacks", "build_loggers"]


def build_loggers(cfg: RunConfig, run_name: str) -> list[LoggerDestination]:
    lc = cfg.loggers
    out: list[LoggerDestination] = []
    if lc.console:
        out.append(ConsoleLine(lc.console_log_interval))
    if lc.jsonl is not None:
        out.append(JsonlLogger(lc.jsonl.path.format(run_name=run_name)))
    if lc.wandb is not None:
        w = lc.wandb
        out.append(
            WandBLogger(
                project=w.project,
                entity=w.entity,
                group=w.group,
                tags=list(w.tags) or None,
                name=run_name,
                log_artifacts=w.log_artifacts,
                init_kwargs={"config": redact(to_container(cfg))},
            )
        )
    return out


def build_callbacks(cfg: RunConfig, spec: dict[str, Any], run_dir: Path) -> list[Callback]:
    cc = cfg.callbacks
    lc = cfg.loggers
    metrics = Path(lc.jsonl.path.format(run_name=cfg.run_name)) if lc.jsonl else None
    ledger = run_dir / "cost_ledger.json" if cc.cost_monitor and cc.cost_monitor.ledger else None
    out: list[Callback] = [RunRecords(spec, run_dir, metrics, ledger), RunSpecRecorder(spec)]
    # One peak for both monitors' MFU: the spec's, else the dense bf16 peak of the GPU named in
    # `cost` or detected (Composer's own lookup knows no H100 NVL and reads an H200 NVL as SXM).
    gpu_type = cfg.cost.gpu_type or detect_gpu_type()
    peak = cc.speed_monitor.gpu_flops_available if cc.speed_monitor is not None else None
    if peak is None and gpu_type is not None:
        peak = get_gpu(gpu_type).peak_flops
    # FP8 linears: MFU stays against the bf16 peak; the FP8 peak's share is logged beside it.
    fp8_peak = get_gpu(gpu_type).fp8_peak_flops if cfg.fp8.enabled and gpu_type else None
    if cc.speed_monitor is not None:
        out.append(
            TrainSpeedMonitor(
                window_size=cc.speed_monitor.window_size,
                gpu_flops_available=peak,
                fp8_peak_flops=fp8_peak,
            )
        )
    if cc.lr_monitor:
        out.append(LRMonitor())
    if cc.memory_monitor and torch.cuda.is_available():
        out.append(MemoryMonitor())
    if cc.runtime_estimator:
        out.append(RuntimeEstimator(time_unit="seconds"))
    if cc.cost_monitor is not None:
        out.append(
            CostMonitor(
                gpu_type=gpu_type,
                price_per_gpu_hour=cfg.cost.price_per_gpu_hour,
                peak_flops=peak,
                # applied through FSDP2, or directly to the blocks without sharding
                activation_checkpointing=bool(cfg.fsdp and cfg.fsdp.activation_checkpointing),
                log_interval=cc.cost_monitor.log_interval,
                ledger_path=str(ledger) if ledger else None,
            )
        )
    return out
