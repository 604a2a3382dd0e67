"""Evaluation: loss/perplexity on eval sets, in-context-learning tasks, and a training callback.

* :func:`evaluate_perplexity` / :class:`EvalSetConfig` -- MDS or JSONL, any length (ALiBi).
* :func:`build_icl_task` / :func:`evaluate_icl` / :class:`ICLTaskConfig` -- multiple choice and
  LM continuation, shipped examples under ``mpt_train/assets/icl``.
* :class:`ICLEvalCallback` -- the ICL tasks at ``eval_interval`` during training.
* :func:`load_eval_spec` / :func:`run_eval` -- what ``scripts/eval.py`` runs.
"""

from mpt_train.eval.callback import ICLEvalCallback
from mpt_train.eval.icl import ICL_ASSETS, ICLTask, ICLTaskConfig, build_icl_task, evaluate_icl
from mpt_train.eval.perplexity import (
    EvalSetConfig,
    PerplexityResult,
    check_eval_length,
    evaluate_perplexity,
)
from mpt_train.eval.spec import EvalSpec, load_eval_spec, run_eval

__all__ = [
    "ICL_ASSETS",
    "EvalSetConfig",
    "EvalSpec",
    "ICLEvalCallback",
    "ICLTask",
    "ICLTaskConfig",
    "PerplexityResult",
    "build_icl_task",
    "check_eval_length",
    "evaluate_icl",
    "evaluate_perplexity",
    "load_eval_spec",
    "run_eval",
]
