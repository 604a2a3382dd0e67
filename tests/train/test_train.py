"""End-to-end training on CPU: metrics, checkpoints, exact resumption, multi-process FSDP."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mpt_train.config import ConfigError, load_config_dict
from mpt_train.loggers.jsonl import read_metrics
from mpt_train.train.builder import train
from tests.helpers import REPO
from tests.train.conftest import SEQ, run, tiny_spec, write_spec


def refused_before_training(spec: dict, key: str, match: str, cwd: Path) -> None:
    """The spec fails with a ConfigError on ``key`` before any batch (no metrics written)."""
    with pytest.raises(ConfigError, match=match) as e:
        train(load_config_dict(spec))
    assert e.value.key == key
    assert not (cwd / "runs/tiny/metrics.jsonl").exists()


def losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss/train/total"] for r in read_metrics(path) if "loss/train/total" in r}


def test_train_logs_metrics_saves_config_and_checkpoints(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-very-secret-42")
    spec = tiny_spec(
        mds_dir,
        max_duration="6ba",
        save_folder=str(tmp_path / "ckpt"),
        save_interval="3ba",
        eval_loader={
            "dataset": {"local": str(mds_dir), "split": "val", "max_seq_len": 32, "shuffle": False},
            "num_workers": 0,
        },
        eval_interval="3ba",
        variables={"note": "${oc.env:MY_SERVICE_TOKEN}"},
    )
    train(load_config_dict(spec))

    rows = read_metrics(tmp_path / "runs/tiny/metrics.jsonl")
    by_step = {r["step"]: r for r in rows}
    assert sorted(s for s, r in by_step.items() if "loss/train/total" in r) == [1, 2, 3, 4, 5, 6]
    last = by_step[6]
    assert any(k.startswith("lr-") for k in last)
    assert last["throughput/tokens_per_sec"] > 0
    assert 0 < last["throughput/device/mfu"] < 1
    assert "metrics/eval/LanguageCrossEntropy" in by_step[6]
    assert (tmp_path / "ckpt" / "ep0-ba3-rank0.pt").is_file()
    assert (tmp_path / "ckpt" / "ep0-ba6-rank0.pt").is_file()
    saved = (tmp_path / "runs/tiny/config.yaml").read_text()
    assert "max_duration: 6ba" in saved and "tok-very-secret-42" not in saved


def test_loss_falls(mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(
        mds_dir,
        max_duration="40ba",
        optimizer={"lr": 5e-3},
        model={**tiny_spec(mds_dir)["model"], "d_model": 64},
    )
    train(load_config_dict(spec))
    loss = losses(tmp_path / "runs/tiny/metrics.jsonl")
    first = sum(loss[s] for s in range(1, 6)) / 5
    last = sum(loss[s] for s in range(36, 41)) / 5
    assert last < first - 1.0, (first, last)


@pytest.mark.slow
def test_sigkill_then_same_command_resumes_bitwise(mds_dir: Path, tmp_path: Path) -> None:
    """Kill the run after batch 5 (checkpoint at 4); the same command resumes with identical
    losses. (Two ranks, a bucket and a kill mid-step: tests/reliability/test_sigkill_resume.py.)"""
    spec = tiny_spec(
        mds_dir,
        global_train_batch_size=4,
        save_interval="2ba",
        fsdp={"sharding_strategy": "FULL_SHARD", "state_dict_type": "sharded"},
    )
    ref = write_spec(
        tmp_path / "ref.yaml",
        {**spec, "run_name": "ref", "save_folder": str(tmp_path / "ref-ckpt")},
    )
    cut = write_spec(
        tmp_path / "cut.yaml",
        {**spec, "run_name": "cut", "save_folder": str(tmp_path / "cut-ckpt")},
    )
    run([sys.executable, str(REPO / "train.py"), str(ref)], cwd=tmp_path)
    killed = run(
        [
            sys.executable,
            str(REPO / "tests/train/kill_after.py"),
            "5",
            "0",
            str(cut),
            "loggers.jsonl.path=runs/cut/first.jsonl",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert killed.returncode != 0
    first = losses(tmp_path / "runs/cut/first.jsonl")
    assert max(first) == 5

    resumed = run(
        [sys.executable, str(REPO / "train.py"), str(cut), "loggers.jsonl.path=second.jsonl"],
        cwd=tmp_path,
    )
    second = losses(tmp_path / "second.jsonl")
    expected = losses(tmp_path / "runs/ref/metrics.jsonl")
    assert sorted(second) == [5, 6, 7, 8], resumed.stdout[-2000:]
    for step in range(1, 6):
        assert first[step] == expected[step]
    for step in range(5, 9):
        assert second[step] == expected[step], (step, second[step], expected[step])


def test_rerun_after_finish_does_not_train_again(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(mds_dir, max_duration="3ba", save_folder="ckpt", save_interval="3ba")
    train(load_config_dict(spec))
    n_rows = len(read_metrics(tmp_path / "runs/tiny/metrics.jsonl"))
    trainer = train(load_config_dict(spec))
    assert int(trainer.state.timestamp.batch) == 3
    assert len(read_metrics(tmp_path / "runs/tiny/metrics.jsonl")) == n_rows
    assert (
        json.loads((tmp_path / "runs/tiny/metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    )


def test_vocab_smaller_than_tokenizer_fails_before_training(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(mds_dir)
    spec["model"]["vocab_size"] = 4096  # the shipped tokenizer has 8192 ids
    refused_before_training(spec, "model.vocab_size", "8192", tmp_path)


def test_a_tokenizer_that_cannot_load_is_one_line_naming_the_key(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hugging Face answers a missing tokenizer with a 50-line traceback; an offline node
    with the default hub name meets it first thing."""
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(mds_dir, tokenizer={"name": str(tmp_path / "no-such-tokenizer")})
    refused_before_training(
        spec, "tokenizer.name", r"cannot load tokenizer .*no-such-tokenizer", tmp_path
    )


def test_compiled_flex_on_cpu_is_refused_before_the_model_is_built(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped pretraining specs compile FlexAttention blocks, which Inductor cannot do on
    a CPU (its backward fails after a 200-line trace): one line says what to change."""
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(mds_dir, compile={"enabled": True})
    spec["model"]["attn_config"]["impl"] = "flex"
    refused_before_training(spec, "compile.enabled", "compiled FlexAttention needs CUDA", tmp_path)


@pytest.mark.parametrize(
    ("fields", "key", "match"),
    [
        ({"compile": {"enabled": True, "mode": "reduce-overhead"}}, "compile.mode", "CUDA graphs"),
        ({"precision": "fp32"}, "model.attn_config.impl", "needs bf16/fp16 activations"),
        ({"device": "cpu"}, "model.attn_config.impl", "on a CPU one of: "),
    ],
)
def test_cudnn_attention_is_refused_before_the_model_is_built(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fields, key, match
) -> None:
    """What impl cudnn cannot run (inside captured CUDA graphs, on fp32 activations) fails with
    one line naming the key, before a model is built or a batch read."""
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(mds_dir, **fields)
    spec["model"]["attn_config"]["impl"] = "cudnn"
    refused_before_training(spec, key, match, tmp_path)


def test_a_new_run_under_an_old_name_starts_a_new_metrics_file_with_eval_first(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No checkpoint to resume: the run starts at batch 0 and its metrics replace the earlier
    run's (whose longer tail would otherwise be read as this run's last rows). An evaluation
    before the first batch (eval_first) is row 0."""
    monkeypatch.chdir(tmp_path)
    train(load_config_dict(tiny_spec(mds_dir, max_duration="5ba")))
    val = {"dataset": {"local": str(mds_dir), "split": "val", "max_seq_len": SEQ}, "num_workers": 0}
    spec = tiny_spec(mds_dir, max_duration="2ba", eval_loader=val, eval_first=True,
                     eval_subset_num_batches=1)  # fmt: skip
    train(load_config_dict(spec))
    rows = read_metrics(tmp_path / "runs/tiny/metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "metrics/eval/LanguageCrossEntropy" in rows[0]


def test_console_prints_the_documented_line_on_rank_zero(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The README's line: ``[batch 120/1000] loss 3.4121 lr 5.90e-04 tok/s 12.3k mfu 41.2%
    ...``, every console_log_interval batches and at the last batch in any duration unit."""
    import re

    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(mds_dir, max_duration="3ba")
    spec["loggers"]["console_log_interval"] = "2ba"
    train(load_config_dict(spec))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[batch ")]
    assert [ln.split("]")[0] for ln in lines] == ["[batch 2/3", "[batch 3/3"]
    pattern = r"\[batch 3/3\] loss \d+\.\d{4} lr \d\.\d\de[-+]\d\d tok/s [\d.]+k? mfu [\d.]+%"
    assert re.match(pattern, lines[-1]), lines[-1]


def test_dry_run_checks_the_batch_split_for_a_world_size(
    mds_dir: Path, tmp_path: Path, capsys
) -> None:
    from mpt_train.cli import main

    path = write_spec(tmp_path / "spec.yaml", tiny_spec(mds_dir, global_train_batch_size=8))
    assert main([str(path), "--dry-run", "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "global_train_batch_size: 8" in out
    assert "# global_train_batch_size 8 over 4 rank(s): 2 per rank" in out
    assert main([str(path), "--dry-run", "--world-size", "3"]) == 2
    assert "global_train_batch_size: 8 does not split across 3 ranks" in capsys.readouterr().err


def test_a_missing_icl_task_file_is_named_by_its_place_before_the_model(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    tasks = [{"label": "ok", "path": "icl/stdlib_mc.jsonl"}, {"label": "x", "path": "nope.jsonl"}]
    refused_before_training(
        tiny_spec(mds_dir, icl_tasks=tasks),
        "icl_tasks.1.path",
        r"ICL task file not found: nope\.jsonl",
        tmp_path,
    )


def test_samples_shorter_than_max_seq_len_are_refused_before_the_model(
    mds_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data was converted at 32 tokens per sample: training at 64 cannot read it, which
    the index says before any model is built (the loader would only fail at its first read)."""
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(mds_dir)
    spec["model"]["max_seq_len"] = 2 * SEQ
    spec["train_loader"]["dataset"]["max_seq_len"] = 2 * SEQ
    refused_before_training(
        spec,
        "train_loader.dataset.max_seq_len",
        r"64 is longer than the 32-token samples",
        tmp_path,
    )
