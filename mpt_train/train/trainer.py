"""The Trainer a run gets: Composer's, with host waits taken out of the step, and the
callback that records the resolved spec with every checkpoint."""

from __future__ import annotations

import datetime
from typing import Any

import torch
from composer import Trainer
from composer.core import Callback
from composer.devices import DeviceGPU
from composer.utils import dist

from mpt_train.train.host_reads import side_stream

__all__ = ["MPTTrainer", "RunSpecRecorder"]


class RunSpecRecorder(Callback):
    """Stores the resolved, redacted spec in every checkpoint (``RunRecords`` writes it next to
    the metrics as ``config.yaml``)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec

    def state_dict(self) -> dict[str, Any]:
        return {"spec": self.spec}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The spec of the resumed run is the one given now; the saved one is for the record."""


class MPTTrainer(Trainer):
    """Composer's Trainer, with host waits taken out of the step.

    * ``optimizer.step()`` without a closure. By default Composer runs the forward and
      backward inside a closure handed to the optimizer and returns ``loss.item()`` from it,
      for optimizers that re-evaluate the loss (LBFGS, SAM): the host then waits for the whole
      backward before it can queue the optimizer's kernels, and the GPU idles for that
      hand-over every step. mpt-train's optimizers (torch's and Composer's AdamW, Lion) never
      read the closure's result. With the loss guard deciding on the device and the norm clip
      folded into the fused step, the host reads nothing back between a step's first forward
      and its update (with ``device_train_microbatch_size: auto`` Composer still reads an OOM
      flag after every forward).
    * With one rank, samples and tokens are counted on the host: Composer adds them up across
      ranks by a device round trip, a wait for the whole update.
    * ``overlap_step_end`` (GPU, no fp16 loss scaling): Composer reads the step's loss with
      ``.cpu().item()`` right after queuing the update, so the host idles until the update
      ends and only then runs the between-step work (callbacks, loggers, the scheduler, the
      next batch) while the GPU idles in turn. Here that read (and the cross-rank counts) run
      on a side stream that waits for the loss only; the default stream is current again
      before any callback runs, so everything that reads weights still waits for the update.
      The loss guard's and the clip's numbers are copied early (:mod:`mpt_train.train.host_reads`).
      Composer still waits for the update at its next-batch check (``iter_finished.item()``
      after fetching the batch), after every forward with ``device_train_microbatch_size:
      auto``, and in ``loss.train_metrics``' sync: the overlap is BATCH_END to the fetch.
    """

    def __init__(self, *args: Any, overlap_step_end: bool = False, **kwargs: Any) -> None:
        self._overlap_step_end = overlap_step_end
        self._loss_ready: torch.cuda.Event | None = None
        self._main: torch.cuda.Stream | None = None
        super().__init__(*args, **kwargs)

    def _use_closures(self) -> bool:
        return False

    def _train_microbatches(
        self, microbatches: Any, total_loss_dict: dict[str, torch.Tensor], ddp_sync: bool = True
    ) -> torch.Tensor:
        loss = super()._train_microbatches(microbatches, total_loss_dict, ddp_sync)
        if self._overlap_step_end and isinstance(self.state.device, DeviceGPU):
            self._loss_ready = torch.cuda.Event()
            self._loss_ready.record()  # after the backward and AFTER_TRAIN_BATCH, before the update
        return loss

    def _train_loop(self) -> None:
        try:
            super()._train_loop()
        finally:  # an error between the loss read and the step end must not leave the side on
            self._back_on_main()

    def _back_on_main(self) -> None:
        if self._main is not None:
            torch.cuda.set_stream(self._main)
            self._main = None

    def _train_batch(self, use_grad_scaling: bool) -> dict[str, torch.Tensor]:
        self._back_on_main()
        self._loss_ready = None
        total = super()._train_batch(use_grad_scaling)
        ready, self._loss_ready = self._loss_ready, None
        # fp16 loss scaling: the scaler's update, next, reads the optimizer's inf checks.
        if ready is None or total is None or use_grad_scaling:
            return total
        side = side_stream()
        self._main = torch.cuda.current_stream()
        side.wait_event(ready)
        for t in total.values():
            t.record_stream(side)  # made on the main stream, read on the side one
        torch.cuda.set_stream(side)  # until _accumulate_time_across_ranks has run
        return total

    def _accumulate_time_across_ranks(
        self, num_samples: int | float, num_tokens: int, batch_time: datetime.timedelta
    ) -> tuple[int, int, datetime.timedelta]:
        """Called once per step, after the loss is read and before any event of the step end."""
        try:
            if dist.get_world_size() == 1:  # a sum over one rank
                return round(num_samples), int(num_tokens), batch_time
            return super()._accumulate_time_across_ranks(num_samples, num_tokens, batch_time)
        finally:
            self._back_on_main()
