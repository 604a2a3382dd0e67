"""In-context-learning tasks: multiple choice and LM continuation, scored like llm-foundry.

Two JSONL formats, one record per line:

* multiple choice ``{"query": str, "choices": [str, ...], "gold": int}``: the model scores each
  ``query + continuation_delimiter + choice`` and picks the choice with the highest mean
  log-likelihood per continuation token (llm-foundry's length-normalised rule, so long choices
  are not penalised for having more tokens);
* LM continuation ``{"context": str, "continuation": str}``: correct when, teacher-forced on
  the context, the argmax at every continuation position is the continuation token, i.e.
  greedy decoding would reproduce it exactly (llm-foundry's ``InContextLearningLMAccuracy``).

``num_fewshot`` solved examples from the same file (never the one being asked, chosen with a
fixed seed) are prepended, separated by ``example_delimiter``. Context and continuation are
tokenized separately so the scored tokens are exactly the continuation's; contexts longer than
``max_seq_len`` are cut from the left.

Legend: B batch, S padded length, V vocab.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from mpt_train.errors import ConfigError
from mpt_train.eval.perplexity import json_lines

__all__ = [
    "ICL_ASSETS",
    "ICL_KINDS",
    "ICLTask",
    "ICLTaskConfig",
    "Scored",
    "build_icl_task",
    "evaluate_icl",
    "for_model",
    "score_continuations",
]

log = logging.getLogger(__name__)

#: Folder of the shipped example tasks; ``path: icl/<file>`` resolves here.
ICL_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "icl"
ICL_KINDS = ("multiple_choice", "lm_continuation")


@dataclass
class ICLTaskConfig:
    """One task in a run spec's ``icl_tasks`` list or an eval spec.

    Attributes:
        label: Name used in metric keys (``icl/<label>/accuracy``).
        path: JSONL file; a bare ``icl/<name>.jsonl`` is one of the shipped example tasks.
        kind: ``multiple_choice`` or ``lm_continuation``.
        num_fewshot: Solved examples prepended to each query.
        continuation_delimiter: Between query/context and the answer.
        example_delimiter: Between few-shot examples.
        max_seq_len: Longest scored sequence (context cut from the left beyond it).
        batch_size: Sequences per forward pass.
    """

    label: str = ""
    path: str = ""
    kind: str = "multiple_choice"
    num_fewshot: int = 0
    continuation_delimiter: str = " "
    example_delimiter: str = "\n"
    max_seq_len: int = 2048
    batch_size: int = 16
    seed: int = 1234

    def __post_init__(self) -> None:
        if not self.label:
            raise ConfigError("label", "required: a name for the task's metrics")
        if self.kind not in ICL_KINDS:
            raise ConfigError("kind", f"got {self.kind!r}, allowed values: {', '.join(ICL_KINDS)}")
        if self.num_fewshot < 0:
            raise ConfigError("num_fewshot", f"got {self.num_fewshot}, must be >= 0")
        if self.batch_size < 1 or self.max_seq_len < 2:
            raise ConfigError("batch_size", "batch_size must be >= 1 and max_seq_len >= 2")

    def resolved_path(self) -> Path:
        path = Path(self.path)
        if not path.is_file() and path.parts[:1] == ("icl",):
            path = ICL_ASSETS.joinpath(*path.parts[1:])
        if not path.is_file():
            raise ConfigError("path", f"ICL task file not found: {self.path}")
        return path


@dataclass
class Scored:
    """One candidate: token ids of context and continuation, and which question it answers."""

    context: list[int]
    continuation: list[int]
    question: int


@dataclass
class ICLTask:
    """A tokenized task: candidates to score, and for multiple choice the gold per question."""

    cfg: ICLTaskConfig
    candidates: list[Scored]
    gold: list[int]  # multiple choice: index of the right choice; LM continuation: unused
    n_questions: int


def for_model(cfg: ICLTaskConfig, learned_pos_emb: bool, model_max_seq_len: int) -> ICLTaskConfig:
    """The task as a model can score it: a learned position table cannot index past its
    length (the context is then cut from the left); ALiBi models take any length."""
    if learned_pos_emb and cfg.max_seq_len > model_max_seq_len:
        return dataclasses.replace(cfg, max_seq_len=model_max_seq_len)
    return cfg


def _records(path: Path, kind: str) -> list[dict]:
    keys = (
        ("query", "choices", "gold") if kind == "multiple_choice" else ("context", "continuation")
    )
    out = []
    for lineno, rec in json_lines(path):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected an object, got {type(rec).__name__}")
        missing = [k for k in keys if k not in rec]
        if missing:
            raise ValueError(f"{path}:{lineno}: {kind} record lacks {missing} (needs {keys})")
        if kind == "multiple_choice" and not 0 <= rec["gold"] < len(rec["choices"]):
            raise ValueError(f"{path}:{lineno}: gold {rec['gold']} not an index of choices")
        out.append(rec)
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def build_icl_task(cfg: ICLTaskConfig, tokenizer: PreTrainedTokenizerBase) -> ICLTask:
    """Read and tokenize a task file into candidates ready for :func:`score_continuations`."""
    recs = _records(cfg.resolved_path(), cfg.kind)
    mc = cfg.kind == "multiple_choice"

    def solved(rec: dict) -> str:
        if mc:
            return rec["query"] + cfg.continuation_delimiter + rec["choices"][rec["gold"]]
        return rec["context"] + cfg.continuation_delimiter + rec["continuation"]

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rng = random.Random(cfg.seed)
    doubled: list[int] = []
    candidates: list[Scored] = []
    gold: list[int] = []
    for q, rec in enumerate(recs):
        others = [i for i in range(len(recs)) if i != q]
        shots = rng.sample(others, min(cfg.num_fewshot, len(others)))
        prefix = "".join(solved(recs[i]) + cfg.example_delimiter for i in shots)
        query = rec["query"] if mc else rec["context"]
        context = encode(prefix + query + cfg.continuation_delimiter.rstrip(" "))
        answers = rec["choices"] if mc else [rec["continuation"]]
        # The delimiter's space belongs to the answer's first token for BPE tokenizers.
        space = " " if cfg.continuation_delimiter.endswith(" ") else ""
        if space and any(a[:1].isspace() for a in answers) and not doubled:
            doubled.append(q)
            log.warning(
                "ICL task %s: answers that start with whitespace (%r in %s) get another from "
                "continuation_delimiter %r; for data that carries its own spacing set "
                "continuation_delimiter: ''",
                cfg.label,
                next(a for a in answers if a[:1].isspace()),
                cfg.path,
                cfg.continuation_delimiter,
            )
        for answer in answers:
            candidates.append(Scored(context, encode(space + answer), q))
        gold.append(rec["gold"] if mc else 0)
    return ICLTask(cfg, candidates, gold, len(recs))


def _padded_length(longest: int, max_seq_len: int) -> int:
    """The next power of two from 64, capped at ``max_seq_len``."""
    return min(max(64, 1 << (longest - 1).bit_length()), max_seq_len)


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module, cands: list[Scored], max_seq_len: int, batch_size: int
) -> tuple[list[float], list[bool]]:
    """Per candidate: mean log-prob of its continuation, and whether greedy reproduces it."""
    device = next(model.parameters()).device
    mean_logprob: list[float] = []
    greedy: list[bool] = []
    for start in range(0, len(cands), batch_size):
        chunk = cands[start : start + batch_size]
        seqs, spans = [], []
        for c in chunk:
            cont = c.continuation[: max_seq_len - 1]
            ctx = c.context[-(max_seq_len - len(cont)) :] if c.context else []
            seqs.append(ctx + cont)
            spans.append((len(ctx), len(ctx) + len(cont)))
        # A few fixed shapes (full batch, power-of-two length): compiled blocks compile each
        # shape once; right padding changes no logit of the real tokens (causal attention).
        length = _padded_length(max(len(s) for s in seqs), max_seq_len)
        ids_BS = torch.zeros(batch_size, length, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids_BS[b, : len(s)] = torch.tensor(s)
        logits_BSV = model(ids_BS.to(device)).float()
        logp_BSV = F.log_softmax(logits_BSV, dim=-1)
        for b, (lo, hi) in enumerate(spans):
            # Position t predicts token t+1: continuation tokens lo..hi-1 come from lo-1..hi-2.
            pred = logp_BSV[b, max(lo - 1, 0) : hi - 1]
            target = ids_BS[b, lo:hi].to(device)
            if lo == 0:  # no context: the first token has no prediction; score the rest
                target = target[1:]
            if target.numel() == 0:
                mean_logprob.append(float("-inf"))
                greedy.append(False)
                continue
            mean_logprob.append(float(pred.gather(-1, target[:, None]).mean()))
            greedy.append(bool((pred.argmax(-1) == target).all()))
    return mean_logprob, greedy


def evaluate_icl(model: torch.nn.Module, task: ICLTask) -> float:
    """Accuracy of ``model`` on ``task`` in [0, 1] (model put in eval mode for the call)."""
    was_training = model.training
    model.eval()
    try:
        logp, greedy = score_continuations(
            model, task.candidates, task.cfg.max_seq_len, task.cfg.batch_size
        )
    finally:
        model.train(was_training)
    if task.cfg.kind == "lm_continuation":
        return sum(greedy) / task.n_questions
    best: dict[int, tuple[float, int]] = {}
    seen: dict[int, int] = {}
    for cand, score in zip(task.candidates, logp):
        choice = seen.get(cand.question, 0)
        seen[cand.question] = choice + 1
        if cand.question not in best or score > best[cand.question][0]:
            best[cand.question] = (score, choice)
    correct = sum(best[q][1] == task.gold[q] for q in range(task.n_questions))
    return correct / task.n_questions
