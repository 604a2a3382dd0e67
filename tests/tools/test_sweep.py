"""Sweeps: resolved specs with unique names, local runs on CPU, collection, Slurm scripts."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mpt_train.config import ConfigError, load_config
from mpt_train.tools.sweep import load_sweep, resolve, write_slurm
from tests.conftest import SWEEP_SEQ as SEQ
from tests.helpers import REPO

QUICKSTART = REPO / "yamls" / "quickstart.yaml"


def write_sweep(tmp_path: Path, data: Path | str, **extra: object) -> Path:
    sweep = {
        "name": "tiny",
        "base": str(QUICKSTART),
        "overrides": [
            f"variables.data={data}",
            f"variables.max_seq_len={SEQ}",
            "model.d_model=64",
            "model.n_layers=2",
            "max_duration=2ba",
            "eval_loader=null",
            "save_folder=null",
            "callbacks.speed_monitor.window_size=1",
            "loggers.console_log_interval=1ba",
        ],
        "grid": {"optimizer.lr": [1.0e-3, 3.0e-3], "global_train_batch_size": [4, 8]},
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_points_resolve_to_loadable_specs_with_unique_names(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, "/data/x", points=[{"optimizer.lr": 0.01, "seed": 3}])
    sweep = load_sweep(path, tmp_path / "out")
    points = resolve(sweep)
    assert len(points) == 5
    assert len({p.run_name for p in points}) == 5
    assert points[0].run_name == "tiny-00-lr0.001-global_train_batch_size4"
    for p in points:
        cfg = load_config(p.spec)  # the written spec stands alone
        assert cfg.run_name == p.run_name
        assert cfg.max_duration == "2ba"
        for key, value in p.overrides.items():
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value
    assert (tmp_path / "out" / "sweep.json").is_file()


# Batches that split across 16 ranks (2 nodes x 8 GPUs).
WIDE = {"optimizer.lr": [1.0e-3, 3.0e-3], "global_train_batch_size": [16, 32]}


def test_points_are_checked_on_the_ranks_they_will_run_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch that does not split across nodes x gpus fails before any script is queued (as
    train.py would refuse it once the job starts); a schedule warning names its point."""
    from mpt_train.tools.sweep_cli import main

    grid = {"global_train_batch_size": [32, 250]}
    path = write_sweep(tmp_path, "/data/x", nodes=2, gpus=8, grid=grid)
    with pytest.raises(ConfigError, match=r"sweep point 1 \{'global_train_batch_size': 250\}"):
        resolve(load_sweep(path, tmp_path / "out"))
    assert (
        main([str(path), "--launcher", "slurm", "--dry-run", "--out-dir", str(tmp_path / "out")])
        == 2
    )
    assert not (tmp_path / "out" / "sweep.json").exists()
    # Locally the points run on `gpus` ranks: 8 splits 32 but not 250 either.
    assert main([str(path), "--dry-run", "--out-dir", str(tmp_path / "local")]) == 2

    caplog.clear()
    warm = write_sweep(tmp_path, "/data/x", grid={"scheduler.t_warmup": ["1ba", "2ba"]})
    resolve(load_sweep(warm, tmp_path / "warm"))
    assert "sweep point 1 {'scheduler.t_warmup': '2ba'}: scheduler.t_warmup" in caplog.text
    assert "sweep point 0" not in caplog.text


def test_a_missing_sweep_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mpt_train.tools.sweep_cli import main

    assert main([str(tmp_path / "nothere.yaml"), "--dry-run"]) == 2
    assert f"sweep file not found: {tmp_path / 'nothere.yaml'}" in capsys.readouterr().err


def test_a_bad_point_fails_before_anything_is_written(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, "/data/x", points=[{"optimizer.lr": -1.0}])
    with pytest.raises(ConfigError, match=r"optimizer\.lr: sweep point 4"):
        resolve(load_sweep(path, tmp_path / "out"))
    with pytest.raises(ConfigError, match="grid"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"name": "x", "base": str(QUICKSTART), "grid": {"a": 1}}))
        load_sweep(bad)


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def test_a_multi_node_sweep_file_also_runs_with_the_local_launcher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The same file serves Slurm (2 nodes) and a local trial run: nodes is noted, not fatal."""
    from mpt_train.tools.sweep_cli import main

    path = write_sweep(tmp_path, "/data/x", nodes=2, gpus=8, grid=WIDE)
    assert main([str(path), "--dry-run", "--out-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.count("composer -n 8 train.py") == 4
    assert "nodes=2 is for --launcher slurm" in caplog.text


def test_slurm_scripts_for_2_nodes_x_8_gpus_give_world_size_ranks_and_master(
    tmp_path: Path,
) -> None:
    path = write_sweep(tmp_path, "/data/x", nodes=2, gpus=8, master_port=29511, grid=WIDE)
    sweep = load_sweep(path, tmp_path / "out")
    points = resolve(sweep)
    scripts = write_slurm(sweep, points, "train.py", dry_run=True, workdir=tmp_path)
    assert len(scripts) == 4
    text = scripts[0].read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text
    assert "#SBATCH --ntasks-per-node=1" in text

    # Execute the script with stand-ins for Slurm and Composer: srun starts the task once per
    # node with that node's SLURM_NODEID, as Slurm does; composer records its arguments.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    _stub(bin_dir, "scontrol", "echo gpu-node-17; echo gpu-node-18\n")
    _stub(
        bin_dir,
        "srun",
        "while [[ $1 == --* ]]; do shift; done\n"
        'for n in $(seq 0 $((SLURM_NNODES-1))); do SLURM_NODEID=$n "$@"; done\n',
    )
    _stub(bin_dir, "composer", f'echo "$@" >> {calls}\n')
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-node-[17-18]",
    }
    subprocess.run(["bash", str(scripts[0])], env=env, check=True, timeout=30)
    lines = calls.read_text().splitlines()
    spec = points[0].spec
    assert lines == [
        f"--world_size 16 --node_rank {n} --master_addr gpu-node-17 --master_port 29511 "
        f"-n 8 train.py {spec}"
        for n in (0, 1)
    ]


def test_slurm_scripts_are_submitted_with_sbatch_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    submitted = tmp_path / "submitted.txt"
    _stub(bin_dir, "sbatch", f'echo "$1" >> {submitted}\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    sweep = load_sweep(
        write_sweep(tmp_path, "/data/x", nodes=2, gpus=8, grid=WIDE), tmp_path / "out"
    )
    scripts = write_slurm(sweep, resolve(sweep), dry_run=False, workdir=tmp_path)
    assert submitted.read_text().split() == [str(s) for s in scripts]


@pytest.mark.slow
def test_sweep_runs_locally_on_cpu_and_collects(tmp_path: Path, sweep_mds: Path) -> None:
    # Two points that differ in global batch (the grid's cross product is resolve()'s, above).
    path = write_sweep(tmp_path, sweep_mds, grid={"global_train_batch_size": [4, 8]})
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "sweep.py"),
        str(path),
        "--train-script",
        str(REPO / "train.py"),
    ]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("composer -n 1") == 2

    run = subprocess.run(
        [*cmd, "--collect"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "runs" / "sweeps" / "tiny"
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row in rows:
        assert row["status"] == "ok"
        assert row["steps"] == "2"
        assert 0.0 < float(row["final_loss"]) < 20.0
        assert float(row["tokens_per_sec"]) > 0
    # Tokens follow each point's global batch: 2 steps x batch x seq.
    assert sorted({float(r["tokens"]) for r in rows}) == [2 * 4 * SEQ, 2 * 8 * SEQ]
    md = (out / "results.md").read_text()
    assert md.count("| ok |") == 2
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_slurm_points_get_their_status_from_what_the_run_left(
    tmp_path: Path, sweep_mds: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slurm hands back no exit status, so the report reads each run's metrics: a run that
    trained to max_duration is ok, one killed midway is incomplete (not "ok"), one never
    started is missing."""
    from mpt_train.tools.sweep_report import collect
    from mpt_train.train.builder import train

    monkeypatch.chdir(tmp_path)
    points_over = [
        {"max_duration": "1024tok", "scheduler.t_warmup": "0.1dur"},
        {"max_duration": "3ba"},
        {"seed": 3},
    ]
    sweep = load_sweep(write_sweep(tmp_path, sweep_mds, grid={}, points=points_over))
    points = resolve(sweep)
    write_slurm(sweep, points, dry_run=True, workdir=tmp_path)
    assert all(p.returncode is None for p in points)

    train(load_config(points[0].spec))  # 2 batches of 16 x 32 tokens: reaches 1024tok
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    killed = subprocess.run(  # SIGKILLed once its first batch is done, as a lost node would be
        [sys.executable, str(REPO / "tests/train/kill_after.py"), "1", "0", points[1].spec],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]

    results, out = collect(sweep.out_dir)
    assert [r.status for r in results] == ["ok", "incomplete (step 1 of 3ba)", "missing"]
    assert [r.steps for r in results] == [2, 1, None]
    with out["csv"].open() as f:
        assert [row["status"] for row in csv.DictReader(f)] == [r.status for r in results]
    # Without its spec there is no max_duration to compare with: say so rather than guess.
    Path(points[0].spec).unlink()
    assert collect(sweep.out_dir)[0][0].status == "unknown"


def test_a_local_point_that_died_before_any_metrics_reads_exit_n(tmp_path: Path) -> None:
    """A point that crashed at startup left no metrics: its exit status is what it reports
    (not ``missing``, which reads as not run yet)."""
    from mpt_train.tools.sweep_report import summarize

    point = {"index": 2, "run_name": "p2", "overrides": {"lr": 1}, "spec": str(tmp_path / "s")}
    gone = str(tmp_path / "never-written.jsonl")
    assert summarize({**point, "metrics": gone, "returncode": 1}).status == "exit 1"
    assert summarize({**point, "metrics": gone, "returncode": None}).status == "missing"


def test_a_sweep_started_outside_the_checkout_runs_its_train_py(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The generated commands run from where sweep.py was started: from another directory
    they name the checkout's train.py by its absolute path instead of a missing ./train.py."""
    from mpt_train.tools.sweep_cli import main

    path = write_sweep(tmp_path, "/data/x")
    monkeypatch.chdir(tmp_path)
    assert main([str(path), "--dry-run", "--out-dir", str(tmp_path / "out")]) == 0
    assert f"composer -n 1 {REPO / 'train.py'} " in capsys.readouterr().out
    assert main([str(path), "--dry-run", "--train-script", "mine.py"]) == 2
    assert "--train-script: mine.py not found" in capsys.readouterr().err
