"""Ctrl-C or a scheduler's SIGTERM: one line saying where the run stopped and how it resumes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO
from tests.train.conftest import tiny_spec, write_spec


def test_sigterm_stops_in_one_line_naming_the_checkpoint_to_resume(
    mds_dir: Path, tmp_path: Path
) -> None:
    spec = tiny_spec(mds_dir, max_duration="400ba", save_folder="ckpt", save_interval="2ba")
    spec_file = write_spec(tmp_path / "spec.yaml", spec)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), str(spec_file)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        deadline = time.monotonic() + 240
        while not (tmp_path / "ckpt" / "ep0-ba2-rank0.pt.manifest.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    stderr = (tmp_path / "err").read_text()
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped: run tiny interrupted at batch "), last
    m = re.search(
        r"at batch (\d+); the same command resumes from (ckpt/ep0-ba(\d+)-rank0\.pt)$", last
    )
    assert m is not None, last
    assert 2 <= int(m.group(3)) <= int(m.group(1))
    assert (tmp_path / f"{m.group(2)}.manifest.json").is_file()  # a complete checkpoint
