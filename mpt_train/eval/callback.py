"""Run ICL tasks during training, on the same schedule as the loss evaluators.

Composer's evaluators only compute metrics over dataloader batches; multiple-choice scoring
needs several candidates per question compared against each other, so the tasks run from a
callback instead. It fires at ``eval_interval`` (and at the end of training), using Composer's
own interval scheduler so it lines up with the loss evaluation, and logs
``icl/<label>/accuracy``. Every rank runs the same forward passes (required under FSDP, whose
all-gathers need all ranks); only rank 0's loggers write.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from composer.core import Callback, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import create_interval_scheduler
from transformers import PreTrainedTokenizerBase

from mpt_train.eval.icl import ICLTask, ICLTaskConfig, build_icl_task, evaluate_icl

__all__ = ["ICLEvalCallback"]

log = logging.getLogger(__name__)


class ICLEvalCallback(Callback):
    """Evaluate ICL tasks every ``interval`` of training and log their accuracy.

    Args:
        tasks: Task configs (tokenized once, at construction).
        tokenizer: The run's tokenizer.
        interval: Composer time string, normally the run's ``eval_interval``.
    """

    def __init__(
        self,
        tasks: Sequence[ICLTaskConfig],
        tokenizer: PreTrainedTokenizerBase,
        interval: str = "1000ba",
    ) -> None:
        self.tasks: list[ICLTask] = [build_icl_task(t, tokenizer) for t in tasks]
        self.interval = interval
        self._due = create_interval_scheduler(
            interval, checkpoint_events=False, final_events={Event.BATCH_END}
        )
        self.history: list[dict[str, float]] = []
        #: Seconds spent evaluating; the cost monitor leaves them out of training throughput.
        self.eval_seconds = 0.0
        self._last_batch: int | None = None

    def _run(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        if batch == self._last_batch:  # the run's end can be due at BATCH_END and EPOCH_END
            return
        self._last_batch = batch
        net = getattr(state.model, "model", state.model)
        t0 = time.monotonic()
        metrics = {}
        # The training step's precision (autocast): flash attention refuses fp32 inputs, and
        # the scores should be those of the model as it trains.
        with get_precision_context(state.precision, state.precision_config):
            for task in self.tasks:
                metrics[f"icl/{task.cfg.label}/accuracy"] = evaluate_icl(net, task)
        self.eval_seconds += time.monotonic() - t0
        logger.log_metrics(metrics)
        self.history.append({"batch": int(state.timestamp.batch), **metrics})
        log.info(
            "ICL at batch %d (%.1fs): %s",
            int(state.timestamp.batch),
            time.monotonic() - t0,
            metrics,
        )

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._due(state, Event.BATCH_END):
            self._run(state, logger)

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self._due(state, Event.EPOCH_END):
            self._run(state, logger)
