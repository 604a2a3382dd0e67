"""scripts/benchmark.py runs the real trainer on CPU and prints one benchmark-table row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpt_train.tools.benchmark import BenchmarkRow, format_row
from tests.conftest import SWEEP_SEQ as SEQ
from tests.helpers import REPO


def test_row_follows_the_llm_foundry_table_and_says_na_without_a_peak() -> None:
    row = BenchmarkRow(
        model="7b",
        params=6_658_859_008,
        seq_len=2048,
        gpus=8,
        gpu="h100",
        micro_batch=6,
        grad_accum=1,
        global_batch=48,
        mfu=None,
        hfu=None,
        tokens_per_sec=85144.0,
        tokens_per_sec_per_gpu=10643.0,
        peak_memory_gb=61.2,
        memory_kind="cuda",
        precision="amp_bf16",
        sharding="FULL_SHARD",
        activation_checkpointing=False,
        steps_timed=7,
    )
    header, _, line = format_row(row).splitlines()
    assert header.startswith("| Model | SeqLen (T) | # GPUs | GPU | MFU | HFU |")
    assert line.startswith("| 7b | 2048 | 8 | h100 | n/a | n/a | 6 | 1 | 48 | 85144 | 10643 |")


@pytest.mark.slow
def test_cpu_benchmark_through_the_trainer_with_a_nominal_peak(
    tmp_path: Path, sweep_mds: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable, str(REPO / "scripts" / "benchmark.py"), str(REPO / "yamls/quickstart.yaml"),
        f"variables.data={sweep_mds}", f"variables.max_seq_len={SEQ}", "model.n_layers=2",
        "global_train_batch_size=4", "--steps", "5", "--warmup", "2", "--peak-flops", "1e11",
        "--json", "--real-data",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads(run.stdout.strip().splitlines()[-1])
    assert row["model"] == "quickstart" and row["seq_len"] == SEQ and row["gpus"] == 1
    assert row["global_batch"] == 4 and row["micro_batch"] == 4 and row["steps_timed"] == 3
    assert row["tokens_per_sec"] > 0 and row["tokens_per_sec"] == row["tokens_per_sec_per_gpu"]
    assert 0 < row["mfu"] < 1 and row["hfu"] == row["mfu"]  # no activation checkpointing
    assert row["precision"] == "fp32" and row["sharding"] == "none" and row["data"] == "spec"
    assert not (tmp_path / "runs").exists() or not list(tmp_path.glob("runs/*/metrics.jsonl"))
    # The spec's own run (run_name: quickstart) is not touched: no spec record overwritten.
    assert not (tmp_path / "runs" / "quickstart").exists()


@pytest.mark.slow
def test_benchmark_of_a_shipped_pretraining_spec_needs_no_data_or_tokenizer(
    tmp_path: Path,
) -> None:
    """``benchmark.py yamls/mpt-125m.yaml`` runs where the bucket and the hub are unreachable
    (a fresh GPU node): synthetic batches of the spec's shape replace its data."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # fmt: skip
    cmd = [
        sys.executable, str(REPO / "scripts" / "benchmark.py"), str(REPO / "yamls/mpt-125m.yaml"),
        "precision=fp32", "compile.enabled=false", "model.attn_config.impl=sdpa",
        "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "variables.max_seq_len=64", "global_train_batch_size=4", "device_train_microbatch_size=2",
        "fsdp.activation_checkpointing=true", "--steps", "4", "--warmup", "1", "--json",
        "--peak-flops", "1e11", "--profile", "prof",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads(run.stdout.strip().splitlines()[-1])
    assert row["model"] == "mpt-125m" and row["data"] == "synthetic"
    assert row["seq_len"] == 64 and row["micro_batch"] == 2 and row["grad_accum"] == 2
    assert row["steps_timed"] == 3 and row["tokens_per_sec"] > 0  # profiled steps come after
    # --profile: a trace and the table of the ops that took the time, printed before the row.
    assert "profile of the last 2 step(s)" in run.stdout and "aten::mm" in run.stdout
    trace = json.loads((tmp_path / "prof" / "trace-rank0.json").read_text())
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    # One rank: no FSDP, but activation checkpointing still applies, and HFU counts it.
    assert row["activation_checkpointing"] and row["sharding"] == "none"
    assert row["hfu"] == pytest.approx(row["mfu"] * 4 / 3) and 0 < row["mfu"] < 1


@pytest.mark.slow
def test_table_runs_every_row_and_a_failing_row_does_not_end_it(tmp_path: Path) -> None:
    from mpt_train.tools.benchmark_table import load_table

    tiny = ["precision=fp32", "compile.enabled=false", "model.attn_config.impl=sdpa",
            "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.vocab_size=256",
            "variables.max_seq_len=32", "global_train_batch_size=2",
            "device_train_microbatch_size=2"]  # fmt: skip
    spec = str(REPO / "yamls/mpt-125m.yaml")
    table = {
        "steps": 3, "warmup": 1, "timeout_s": 240,
        "rows": [
            {"name": "typo", "spec": spec, "overrides": ["model.n_layerz=1"]},
            {"name": "tiny-125m", "spec": spec, "overrides": tiny, "steps": 4, "warmup": 2},
        ],
    }  # fmt: skip
    path = tmp_path / "table.yaml"
    path.write_text(json.dumps(table))  # JSON is YAML
    assert len(load_table(path).rows) == 2
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(REPO / "scripts/benchmark_table.py"), str(path),
           "--json", str(tmp_path / "rows.json"), "--logs", str(tmp_path / "logs"),
           "--record", str(tmp_path / "records")]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stderr[-3000:]  # one row failed
    table_lines = [ln for ln in run.stdout.splitlines() if ln.startswith("| ")]
    assert table_lines[-2].startswith("| typo | **") and "model.n_layerz" in table_lines[-2]
    assert table_lines[-1].startswith("| tiny-125m | 32 | 1 |")
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert "n_layerz" in rows[0]["result"]["error"] and rows[1]["result"]["seq_len"] == 32
    losses = rows[1]["result"]["losses"]  # every step's, for comparing two rows' numerics
    assert len(losses) == 4 and all(4.0 < x < 8.0 for x in losses)  # near ln(256) = 5.5
    assert rows[1]["result"]["steps_timed"] == 2  # the row's own steps and warm-up
    assert "n_layerz" in (tmp_path / "logs/typo.log").read_text()
    assert (tmp_path / "logs/tiny-125m.log").read_text().startswith("{")
    # The rows that ran, as a dated record with the stack they ran on (the failed row is not).
    import torch

    from mpt_train.tools.records import load_records

    (record,) = load_records(tmp_path / "records")
    assert list(record.rows) == ["tiny-125m"] and record.rows["tiny-125m"].losses == losses
    assert record.gpu_type == "cpu" and record.stack["torch"] == torch.__version__
    assert "--record" in record.command and record.path.name == f"{record.date}-cpu.json"


def test_table_file_rejects_unknown_keys_by_name(tmp_path: Path) -> None:
    from mpt_train.errors import ConfigError
    from mpt_train.tools.benchmark_table import load_table

    path = tmp_path / "table.yaml"
    path.write_text("rows:\n  - spec: yamls/mpt-1b.yaml\n    overides: [a=1]\n")
    with pytest.raises(ConfigError, match="overides"):
        load_table(path)
    path.write_text("rows: []\n")
    with pytest.raises(ConfigError, match="no rows"):
        load_table(path)
    path.write_text("rows:\n  - spec: yamls/mpt-1b.yaml\n  - {spec: x.yaml, steps: 2, warmup: 2}\n")
    with pytest.raises(ConfigError, match="2/2") as info:
        load_table(path)
    assert info.value.key == "rows.1.steps"


def test_only_names_rows_that_exist(capsys: pytest.CaptureFixture[str]) -> None:
    from mpt_train.tools.benchmark_table import main

    assert main([str(REPO / "yamls/benchmarks/h100.yaml"), "--only", "mpt-1b", "mpt-2b"]) == 2
    assert "['mpt-2b'] not in" in capsys.readouterr().err  # nothing ran


def test_shipped_h100_table_covers_the_sizes_and_loads() -> None:
    from mpt_train.config import load_config
    from mpt_train.tools.benchmark_table import load_table

    table = load_table(REPO / "yamls/benchmarks/h100.yaml")
    assert {"mpt-125m", "mpt-350m", "mpt-1b", "mpt-3b"} <= {r.name for r in table.rows}
    for row in table.rows:  # every row is a valid run spec with its overrides
        cfg = load_config(REPO / row.spec, row.overrides)
        fast = cfg.compile.enabled
        assert fast != row.name.endswith("-plain"), row.name  # baselines have the options off
        if not fast:
            assert cfg.optimizer.implementation == "composer"
            assert cfg.model.attn_config.impl == "sdpa"
        elif row.name.endswith("-cudnn") and "-sdpa" not in row.name:
            assert cfg.model.attn_config.impl == "cudnn", row.name  # cuDNN's own ALiBi kernel
        elif "-sdpa" not in row.name:
            assert cfg.model.attn_config.impl == "flex", row.name


def test_table_budget_lists_rows_it_has_no_time_for_and_only_sets_the_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mpt_train.tools.benchmark_table import main

    table = str(REPO / "yamls/benchmarks/h100.yaml")
    assert main([table, "--only", "mpt-1b", "mpt-125m", "--budget-s", "0"]) == 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| mpt")]
    assert [ln.split(" | ")[0] for ln in lines[-2:]] == ["| mpt-1b", "| mpt-125m"]
    assert all("not run: the table's time budget was spent" in ln for ln in lines)


def test_table_row_without_a_result_line_is_a_failed_row_not_a_crash() -> None:
    from mpt_train.tools.benchmark_table import _result

    def done(out: str, rc: int = 0, err: str = "") -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess([], rc, out, err)

    assert _result(done("")).startswith("no result row")
    assert _result(done("some library said goodbye\n")).startswith("no result row")
    assert _result(done("", 1, "x\ntorch.OutOfMemoryError: CUDA out of memory")) == "out of memory"
    # A compile failure as torch prints it on a GPU: every traceback line prefixed with the
    # rank, then a process-group warning after it. The row names the error, not the warning.
    err = (
        "[rank0]: Traceback (most recent call last):\n"
        '[rank0]:   File "mpt.py", line 129, in forward\n'
        "[rank0]: torch._inductor.exc.InductorError: LoweringException: TypeError: launcher()\n"
        "[rank0]:   target: flex_attention\n"
        "\n[rank0]:[W1126 23:46:36.573330560 ProcessGroupNCCL.cpp:1575] Warning: WARNING: "
        "destroy_process_group() was not called before program exit\n"
    )
    assert _result(done("", 1, err)).startswith("torch._inductor.exc.InductorError: Lowering")


@pytest.mark.slow
def test_benchmark_on_two_ranks_shards_and_reports_per_gpu(tmp_path: Path) -> None:
    """``composer -n N scripts/benchmark.py SPEC``: synthetic batches split over the ranks
    (Composer refuses a loader without a distributed sampler), rank 0 prints the row."""
    from tests.train.conftest import composer_cmd, run

    cmd = [
        *composer_cmd(2), str(REPO / "scripts" / "benchmark.py"), str(REPO / "yamls/mpt-125m.yaml"),
        "precision=fp32", "compile.enabled=false", "model.attn_config.impl=sdpa",
        "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "variables.max_seq_len=64", "global_train_batch_size=4", "device_train_microbatch_size=2",
        "--steps", "4", "--warmup", "1", "--json",
    ]  # fmt: skip
    out = run(cmd, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"}).stdout
    row = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    assert row["gpus"] == 2 and row["sharding"] == "FULL_SHARD" and row["grad_accum"] == 1
    assert row["tokens_per_sec_per_gpu"] == pytest.approx(row["tokens_per_sec"] / 2)


def test_benchmark_of_a_spec_scheduled_in_tokens(tmp_path: Path, monkeypatch) -> None:
    """MPT-7B's spec counts its warmup in tokens (as its max_duration); the benchmark's own
    batch-counted duration must not turn that into a schedule error."""
    from mpt_train.config import load_config
    from mpt_train.tools.benchmark import run_benchmark

    monkeypatch.chdir(tmp_path)
    tiny = ["precision=fp32", "model.attn_config.impl=sdpa", "model.n_layers=1",
            "model.d_model=32", "model.n_heads=2", "model.vocab_size=256",
            "variables.max_seq_len=32", "global_train_batch_size=2",
            "device_train_microbatch_size=2"]  # fmt: skip
    cfg = load_config(REPO / "yamls/mpt-7b-1t.yaml", tiny)
    assert cfg.scheduler.t_warmup.endswith("tok")
    row = run_benchmark(cfg, steps=3, warmup=1, peak_flops=1e11, name="7b-1t-tiny")
    assert row.model == "7b-1t-tiny" and row.steps_timed == 2 and row.tokens_per_sec > 0


def test_profile_busy_time_leaves_out_ranges_that_annotate_other_kernels() -> None:
    """Each kernel once: not again under the op that launched it, nor under
    ``Optimizer.step#AdamW.step`` (counting those, the GPU read 285% busy on an H100)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from mpt_train.tools.benchmark import _busy_us

    def ev(name: str, us: float, annotation: bool = False, cpu: bool = False) -> SimpleNamespace:
        device = DeviceType.CPU if cpu else DeviceType.CUDA
        return SimpleNamespace(
            name=name, self_device_time_total=us, is_user_annotation=annotation, device_type=device
        )

    events = [
        ev("nvjet_sm90_tst_256x128", 100.0),
        ev("aten::mm", 100.0, cpu=True),  # the op that launched it carries its time too
        ev("multi_tensor_apply_kernel", 20.0),
        ev("Optimizer.step#AdamW.step", 20.0),
        ev("ProfilerStep#3", 140.0),
        ev("my_region", 50.0, annotation=True),
    ]
    assert _busy_us(events, "self_device_time_total") == 120.0


def test_idle_gaps_name_the_kernels_around_them_and_the_host_work_inside() -> None:
    """The profile's gap report: kernels that overlap are one busy span, a gap shorter than
    the threshold is not reported, and each gap lists the outermost host ops inside it
    (not the annotations around them, and not their child ops)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from mpt_train.tools.idle_gaps import format_gaps, gaps_from_profile

    def ev(name, start, end, device=DeviceType.CPU, parent=None, annotation=False):
        span = SimpleNamespace(start=start, end=end)
        return SimpleNamespace(name=name, time_range=span, device_type=device,
                               cpu_parent=parent, is_user_annotation=annotation)  # fmt: skip

    gpu = DeviceType.CUDA
    step = ev("ProfilerStep#7", 0, 2000)
    item = ev("aten::item", 350, 360, parent=step)
    events = [
        step,
        ev("gemm", 0, 300, gpu),
        ev("flex_fwd", 250, 310, gpu),  # overlaps gemm: busy until 310
        ev("adamw_kernel", 315, 330, gpu),  # 5 us after: below the threshold
        item,
        ev("aten::_local_scalar_dense", 351, 359, parent=item),  # inside item: not counted again
        ev("aten::copy_", 500, 700),  # H2D copy of the next batch
        ev("embedding_kernel", 1330, 1400, gpu),  # 1000 us idle after adamw_kernel
        ev("gemm", 1500, 1600, gpu),  # 100 us idle, no host op inside: only a range around it
        ev("enumerate(DataLoader)#_MultiProcessingDataLoaderIter.__next__", 1410, 1590),
    ]
    gaps = gaps_from_profile(events, min_us=20.0)
    assert [(g.before, g.after, g.duration) for g in gaps] == [
        ("adamw_kernel", "embedding_kernel", 1000.0),
        ("embedding_kernel", "gemm", 100.0),
    ]
    assert gaps[0].host == {"aten::item": 10.0, "aten::copy_": 200.0}
    assert gaps[0].ranges == {}  # host ops explain it; the step range around it is not listed
    assert gaps[1].host == {}
    assert list(gaps[1].ranges) == [  # innermost first
        "enumerate(DataLoader)#_MultiProcessingDataLoaderIter.__next__", "ProfilerStep#7",
    ]  # fmt: skip
    text = format_gaps(gaps, steps=1, wall_ms=2.0)
    first, largest, second = text.splitlines()
    assert "1.1 ms/step (55% of the step), 2 gaps" in first
    assert "adamw_kernel -> embedding_kernel" in largest and "aten::copy_ 0.20" in largest
    assert "host ops 0.00 ms/step: inside enumerate(DataLoader)#" in second


@pytest.mark.parametrize(
    ("table", "pairs"),
    [
        ("h100", [("mpt-7b-8l-fp8", "mpt-7b-8l"), ("mpt-7b-8l-fp8-rowwise", "mpt-7b-8l"),
                  ("mpt-1b-fp8", "mpt-1b")]),
        ("h200", [("mpt-7b-ac-fp8", "mpt-7b-ac")]),
    ],
)  # fmt: skip
def test_fp8_rows_are_their_bf16_row_with_fp8_on(table: str, pairs: list[tuple[str, str]]) -> None:
    """Each FP8 row times the same model, batch and options as the row it is compared with."""
    from dataclasses import replace

    from mpt_train.config import load_config
    from mpt_train.tools.benchmark_table import load_table

    rows = {r.name: r for r in load_table(REPO / f"yamls/benchmarks/{table}.yaml").rows}
    for fp8_name, base_name in pairs:
        fp8, base = (
            load_config(REPO / rows[n].spec, rows[n].overrides) for n in (fp8_name, base_name)
        )
        assert fp8.fp8.enabled and not base.fp8.enabled
        assert replace(fp8, fp8=base.fp8) == base, fp8_name
    h7 = load_config(REPO / rows[pairs[0][1]].spec, rows[pairs[0][1]].overrides).model
    assert (h7.d_model, h7.n_heads) == (4096, 32)  # the MPT-7B layer shape
