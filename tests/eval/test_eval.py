"""ICL scoring, perplexity (ALiBi extrapolation vs learned positions), eval CLI and callback."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from mpt_train.config import load_config_dict
from mpt_train.data import load_tokenizer
from mpt_train.eval import (
    EvalSetConfig,
    ICLTaskConfig,
    build_icl_task,
    evaluate_icl,
    evaluate_perplexity,
)
from mpt_train.eval.icl import score_continuations
from mpt_train.export import load_model
from mpt_train.loggers.jsonl import read_metrics
from mpt_train.model import MPTConfig, build_model
from mpt_train.train.builder import train
from tests.export.tiny_run import tiny_mds, train_tiny
from tests.helpers import REPO
from tests.train.conftest import tiny_spec

MC = ICLTaskConfig(
    label="mc",
    path="icl/stdlib_mc.jsonl",
    kind="multiple_choice",
    num_fewshot=2,
    max_seq_len=128,
    batch_size=5,
)
LM = ICLTaskConfig(
    label="lm",
    path="icl/stdlib_continuation.jsonl",
    kind="lm_continuation",
    continuation_delimiter="",  # the shipped continuations carry their own spacing
    num_fewshot=1,
    max_seq_len=128,
    batch_size=5,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("mpt-train/tiny-bpe")


class Oracle(torch.nn.Module):
    """Predicts each token of the given target sequences with certainty (others: uniform)."""

    def __init__(self, targets: list[list[int]], vocab: int = 8192) -> None:
        super().__init__()
        self.next = {tuple(t[:i]): t[i] for t in targets for i in range(1, len(t))}
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*ids_BS.shape, self.vocab)
        for b, row in enumerate(ids_BS.tolist()):
            for t in range(len(row)):
                nxt = self.next.get(tuple(row[: t + 1]))
                if nxt is not None:
                    out[b, t, nxt] = 30.0
        return out


def test_oracle_scores_full_marks_and_wrong_oracle_zero(tok) -> None:
    for cfg in (MC, LM):
        task = build_icl_task(cfg, tok)
        gold = [
            c.context + c.continuation
            for c in task.candidates
            if cfg.kind == "lm_continuation"
            or task.candidates.index(c) - _first(task, c.question) == task.gold[c.question]
        ]
        assert evaluate_icl(Oracle(gold), task) == 1.0
    assert evaluate_icl(Oracle([]), build_icl_task(LM, tok)) == 0.0
    mc = build_icl_task(MC, tok)
    wrong = [
        c.context + c.continuation
        for c in mc.candidates
        if mc.candidates.index(c) - _first(mc, c.question) != mc.gold[c.question]
    ][::3]
    assert evaluate_icl(Oracle(wrong), mc) == 0.0


def test_icl_scoring_keeps_no_autograd_graph(tok) -> None:
    """Scoring must not record a graph: during training, each ICL batch would otherwise hold
    every layer's activations and the fp32 log-probs ``[B, S, 50432]`` for a backward that
    never comes, on top of the weights and optimizer state (an OOM at eval time)."""
    from mpt_train.model import MPTConfig, build_model

    model = build_model(MPTConfig(d_model=16, n_heads=2, n_layers=1, max_seq_len=64,
                                  vocab_size=len(tok) + 8))  # fmt: skip
    grad_modes = []
    model.register_forward_hook(lambda m, i, out: grad_modes.append(out.requires_grad))
    evaluate_icl(model, build_icl_task(MC, tok))
    assert grad_modes and not any(grad_modes)
    assert torch.is_grad_enabled()  # the caller's mode is restored


def _first(task, q: int) -> int:
    return next(i for i, c in enumerate(task.candidates) if c.question == q)


def test_batched_scores_equal_one_by_one_reference(tok) -> None:
    """Padding and batching do not change any candidate's score (checked by hand, unbatched)."""
    net = build_model(
        MPTConfig(
            d_model=32,
            n_heads=2,
            n_layers=2,
            max_seq_len=128,
            vocab_size=8192,
            attn_config={"impl": "torch"},
        )
    ).eval()
    task = build_icl_task(MC, tok)
    shapes = set()
    net.register_forward_pre_hook(lambda _m, args: shapes.add(tuple(args[0].shape)))
    got, _ = score_continuations(net, task.candidates, 128, batch_size=7)
    # Few fixed shapes, so compiled blocks do not recompile for every batch's longest example.
    assert shapes and all(b == 7 and n in (64, 128) for b, n in shapes), shapes
    for cand, score in zip(task.candidates[:8], got[:8]):
        ids = torch.tensor([cand.context + cand.continuation])
        with torch.no_grad():
            logp = F.log_softmax(net(ids)[0], -1)
        n = len(cand.context)
        ref = torch.stack([logp[n - 1 + i, t] for i, t in enumerate(cand.continuation)]).mean()
        assert score == pytest.approx(float(ref), abs=1e-5)
    assert len(task.candidates) == 12 * 4 and task.n_questions == 12


def test_alibi_extrapolates_learned_positions_refuse(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, tok
) -> None:
    """Trained at S=32: ALiBi evaluates at 64 and 128 with finite loss; wpe refuses past 32."""
    mds128 = tiny_mds(tmp_path_factory, 128)
    ckpt = train_tiny(tmp_path, mds128)  # tiny_spec trains at max_seq_len 32
    model, _ = load_model(ckpt)
    assert model.cfg.max_seq_len == 32
    losses = {}
    for s in (32, 64, 128):
        r = evaluate_perplexity(
            model,
            EvalSetConfig(mds=str(mds128), split="val", max_seq_len=s, batch_size=4, max_batches=2),
            tok,
        )
        assert math.isfinite(r.loss) and r.tokens == 2 * 4 * (s - 1)
        losses[s] = r.loss
    assert losses[128] < 2 * losses[32]  # extrapolation degrades gracefully, no blow-up

    wpe = build_model(
        MPTConfig(
            d_model=32,
            n_heads=2,
            n_layers=2,
            max_seq_len=32,
            vocab_size=8192,
            learned_pos_emb=True,
            attn_config={"impl": "torch", "alibi": False},
        )
    )
    ok = EvalSetConfig(mds=str(mds128), max_seq_len=32, batch_size=4, max_batches=1)
    assert math.isfinite(evaluate_perplexity(wpe, ok, tok).loss)
    with pytest.raises(ValueError, match=r"64 exceeds the learned position .*max_seq_len 32"):
        evaluate_perplexity(wpe, EvalSetConfig(mds=str(mds128), max_seq_len=64), tok)


def test_jsonl_perplexity_matches_manual_cross_entropy(tmp_path: Path, tok) -> None:
    texts = ["The json module encodes objects.", "Regular expressions live in re."] * 3
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    net = build_model(
        MPTConfig(
            d_model=32,
            n_heads=2,
            n_layers=1,
            max_seq_len=16,
            vocab_size=8192,
            attn_config={"impl": "torch"},
        )
    ).eval()
    r = evaluate_perplexity(net, EvalSetConfig(jsonl=str(path), max_seq_len=16), tok)
    stream = [i for t in texts for i in [*tok(t)["input_ids"], tok.eos_token_id]]
    rows = [stream[i : i + 16] for i in range(0, len(stream), 16)]
    total = n = 0
    with torch.no_grad():
        for row in rows:
            if len(row) < 2:
                continue
            ids = torch.tensor([row])
            total += float(F.cross_entropy(net(ids)[0, :-1], ids[0, 1:], reduction="sum"))
            n += len(row) - 1
    assert r.tokens == n and r.loss == pytest.approx(total / n, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(total / n), rel=1e-5)


def test_shipped_continuations_are_scored_as_written(tok, caplog) -> None:
    """The shipped continuations carry their own spacing (" False"; "loads" after "json."):
    with ``continuation_delimiter: ""`` each candidate is the record's text exactly. The
    default delimiter would add a space to every answer: a warning says so."""
    import dataclasses

    path = LM.resolved_path()
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    task = build_icl_task(dataclasses.replace(LM, num_fewshot=0), tok)
    for c, rec in zip(task.candidates, recs, strict=True):
        assert tok.decode(c.context) == rec["context"]
        assert tok.decode(c.continuation) == rec["continuation"]
    assert "continuation_delimiter" not in caplog.text
    build_icl_task(dataclasses.replace(LM, continuation_delimiter=" "), tok)
    assert "get another from continuation_delimiter ' '" in caplog.text


def test_jsonl_files_split_on_newlines_only(tmp_path: Path, tok) -> None:
    """JSON leaves U+2028 raw inside strings (``ensure_ascii=False``): such a file is valid
    JSONL for perplexity and ICL alike. A record that is not an object is named by line."""
    texts = ["line\u2028separator and \x85 next-line inside", "A plain second document."]
    texts = [t.encode().decode("unicode_escape") for t in texts]
    ppl = tmp_path / "t.jsonl"
    ppl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    net = build_model(MPTConfig(d_model=16, n_heads=2, n_layers=1, max_seq_len=16,
                                vocab_size=8192, attn_config={"impl": "torch"}))  # fmt: skip
    assert evaluate_perplexity(net, EvalSetConfig(jsonl=str(ppl), max_seq_len=16), tok).tokens > 0
    icl = tmp_path / "c.jsonl"
    recs = [{"context": t, "continuation": " x"} for t in texts]
    icl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    cfg = ICLTaskConfig(label="u", path=str(icl), kind="lm_continuation", continuation_delimiter="")
    assert build_icl_task(cfg, tok).n_questions == 2

    ppl.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(["a", "list"]) + "\n")
    with pytest.raises(ValueError, match=rf"{ppl}:2: no string field 'text'"):
        evaluate_perplexity(net, EvalSetConfig(jsonl=str(ppl), max_seq_len=16), tok)
    icl.write_text(json.dumps(["a", "list"]) + "\n")
    with pytest.raises(ValueError, match=rf"{icl}:1: expected an object, got list"):
        build_icl_task(cfg, tok)


def test_perplexity_of_a_document_masked_model_uses_the_masks(tmp_path: Path, tok) -> None:
    """A model trained with ``attn_uses_sequence_id`` is scored with each document attending
    to itself only, as training and the trainer's eval loaders score it."""
    from mpt_train.data.text_dataset import sequence_ids

    texts = ["The json module encodes objects.", "Regular expressions live in re."] * 3
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    torch.manual_seed(0)
    net = build_model(MPTConfig(d_model=32, n_heads=2, n_layers=2, max_seq_len=32,
                                vocab_size=8192,
                                attn_config={"impl": "torch", "attn_uses_sequence_id": True})
                      ).eval()  # fmt: skip
    r = evaluate_perplexity(net, EvalSetConfig(jsonl=str(path), max_seq_len=32), tok)
    stream = [i for t in texts for i in [*tok(t)["input_ids"], tok.eos_token_id]]
    rows = [torch.tensor([stream[i : i + 32]]) for i in range(0, len(stream), 32)]
    rows = [ids for ids in rows if ids.shape[1] > 1]
    with torch.no_grad():

        def loss(masked: bool) -> float:
            total = sum(
                float(F.cross_entropy(
                    net(ids, sequence_id=sequence_ids(ids, tok.eos_token_id) if masked else None
                        )[0, :-1], ids[0, 1:], reduction="sum"))
                for ids in rows
            )  # fmt: skip
            return total / sum(ids.shape[1] - 1 for ids in rows)

        assert r.loss == pytest.approx(loss(True), rel=1e-6)
        assert abs(loss(False) - loss(True)) > 1e-5  # the masks matter to this model


def test_icl_during_training_fits_a_learned_position_table(
    mds32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ICL tasks default to 2048-token sequences; a model with learned positions trained at 32
    scores them cut to 32 (as ``scripts/eval.py`` does) instead of failing at the first eval."""
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(mds32, max_duration="2ba", eval_interval="2ba", eval_loader=None,
                     icl_tasks=[{"label": "mc", "path": "icl/stdlib_mc.jsonl", "num_fewshot": 3}])  # fmt: skip
    spec["model"].update(learned_pos_emb=True, attn_config={"impl": "torch", "alibi": False})
    train(load_config_dict(spec))
    rows = read_metrics(tmp_path / "runs/tiny/metrics.jsonl")
    assert [r["step"] for r in rows if "icl/mc/accuracy" in r] == [2]


def test_eval_script_reports_sets_and_tasks(tiny_ckpt: Path, mds32: Path, tmp_path: Path) -> None:
    spec = {
        "model": str(tiny_ckpt),
        "attn_impl": "torch",
        "eval_sets": {"val": {"mds": str(mds32), "max_seq_len": 32, "max_batches": 2}},
        "icl_tasks": [MC.__dict__, LM.__dict__],
    }
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "r.json"
    cmd = [
        sys.executable,
        str(REPO / "scripts/eval.py"),
        str(tmp_path / "e.yaml"),
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert math.isfinite(res["eval/val/loss"]) and res["eval/val/perplexity"] > 1
    assert 0 <= res["icl/mc/accuracy"] <= 1 and 0 <= res["icl/lm/accuracy"] <= 1
    assert "icl/mc/accuracy" in proc.stdout

    spec["icl_tasks"][0]["kind"] = "multiple-choice"
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(spec))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "icl_tasks.0.kind" in proc.stderr


def test_icl_callback_logs_at_eval_interval(
    mds32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(
        mds32,
        max_duration="4ba",
        eval_interval="2ba",
        icl_tasks=[{**LM.__dict__, "max_seq_len": 32}],
    )
    train(load_config_dict(spec))
    rows = read_metrics(tmp_path / "runs/tiny/metrics.jsonl")
    steps = sorted(r["step"] for r in rows if "icl/lm/accuracy" in r)
    assert steps == [2, 4]


def test_icl_runs_once_at_a_run_end_on_an_epoch_boundary(
    mds32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an epoch interval the end of training is due at BATCH_END and again at EPOCH_END:
    the final ICL pass runs once, and its time is reported for the cost monitor."""
    from mpt_train.eval.callback import ICLEvalCallback

    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(mds32, max_duration="8ba", eval_interval="1ep", eval_loader=None,
                     icl_tasks=[{**LM.__dict__, "max_seq_len": 32}])  # fmt: skip
    spec["train_loader"]["dataset"]["epoch_size"] = 16  # 4 batches of 4
    trainer = train(load_config_dict(spec))
    [icl] = [cb for cb in trainer.state.callbacks if isinstance(cb, ICLEvalCallback)]
    assert [h["batch"] for h in icl.history] == [4, 8]
    assert icl.eval_seconds > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's answer")
def test_cuda_on_a_machine_without_one_is_one_line(tiny_ckpt: Path, tmp_path: Path) -> None:
    spec = {"model": str(tiny_ckpt), "device": "cuda", "icl_tasks": [{**LM.__dict__}]}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(spec))
    for cmd in (
        [sys.executable, str(REPO / "scripts/eval.py"), str(tmp_path / "e.yaml")],
        [sys.executable, str(REPO / "scripts/generate.py"), str(tiny_ckpt), "--prompt", "hi",
         "--device", "cuda"],
    ):  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "no CUDA device is visible" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_runs_in_the_requested_precision(
    tiny_ckpt: Path, mds32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``precision: amp_bf16`` evaluates under autocast, as GPU training ran (and as flash
    attention requires); the loss stays that of the fp32 evaluation to bf16 accuracy."""
    import torch

    from mpt_train.errors import ConfigError
    from mpt_train.eval.spec import load_eval_spec, run_eval
    from mpt_train.model import MPTModel

    spec = {"model": str(tiny_ckpt), "attn_impl": "torch",
            "eval_sets": {"val": {"mds": str(mds32), "max_seq_len": 32, "max_batches": 2}}}  # fmt: skip
    seen: list[torch.dtype] = []
    real = MPTModel.forward
    monkeypatch.setattr(
        MPTModel,
        "forward",
        lambda self, *a, **k: seen.append((out := real(self, *a, **k)).dtype) or out,
    )
    results, dtypes = {}, {}
    for precision in ("fp32", "amp_bf16"):
        (tmp_path / "e.yaml").write_text(yaml.safe_dump({**spec, "precision": precision}))
        seen.clear()
        results[precision] = run_eval(load_eval_spec(tmp_path / "e.yaml"))["eval/val/loss"]
        dtypes[precision] = set(seen)
    assert dtypes == {"fp32": {torch.float32}, "amp_bf16": {torch.bfloat16}}
    assert results["amp_bf16"] == pytest.approx(results["fp32"], rel=2e-2)
    (tmp_path / "e.yaml").write_text(yaml.safe_dump({**spec, "precision": "bf16"}))
    with pytest.raises(ConfigError, match="precision"):
        load_eval_spec(tmp_path / "e.yaml")


def test_eval_spec_unknown_key_suggests_the_near_one(tmp_path: Path) -> None:
    from mpt_train.errors import ConfigError
    from mpt_train.eval.spec import load_eval_spec

    spec = {"model": "m", "eval_sets": {"val": {"jsonl": "v.jsonl", "batchsize": 3}}}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"did you mean eval_sets\.val\.batch_size\?") as e:
        load_eval_spec(tmp_path / "e.yaml")
    assert e.value.key == "eval_sets.val.batchsize"
