"""scripts/generate.py: checkpoint or HF folder, sampling options, KV cache, tokens/s."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import torch

from mpt_train.export import export_hf
from tests.helpers import REPO


def _generate(model: Path, *args: str) -> subprocess.CompletedProcess:
    """The command as a user runs it."""
    cmd = [sys.executable, str(REPO / "scripts/generate.py"), str(model), "--threads", "1", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _generate_here(model: Path, *args: str) -> str:
    """The same main in this process (no interpreter start-up): its stdout."""
    spec = importlib.util.spec_from_file_location("generate_script", REPO / "scripts/generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, threads = io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out):
            assert script.main([str(model), "--threads", "1", *args]) == 0
    finally:
        torch.set_num_threads(threads)
    return out.getvalue()


def _texts(stdout: str) -> list[str]:
    return re.findall(r"### prompt \d+: [^\n]*\n(.*?)\n--- ", stdout, flags=re.S)


def test_generate_from_checkpoint_and_hf_folder(tiny_ckpt: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text('The json module\n\n{"prompt": "def main"}\n')
    sample = [
        "--prompts-file",
        str(prompts),
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ]
    a = _generate(tiny_ckpt, *sample)
    assert len(_texts(a.stdout)) == 2 and _texts(a.stdout)[1].startswith("def main")
    assert re.search(
        r"total: \d+ new tokens in [\d.]+ s: [\d.]+ tokens/s \(KV cache on\)", a.stdout
    )
    # Same seed, same tokens: with or without the KV cache, and from the exported HF folder.
    assert _texts(_generate_here(tiny_ckpt, *sample, "--no-cache")) == _texts(a.stdout)
    hf = export_hf(tiny_ckpt, tmp_path / "hf")
    assert _texts(_generate_here(hf, *sample)) == _texts(a.stdout)
    # Another seed samples differently; greedy (temperature 0) ignores the seed.
    assert _texts(_generate_here(tiny_ckpt, *sample[:-1], "4")) != _texts(a.stdout)
    greedy = ["--prompt", "The json module", "--max-new-tokens", "12", "--seed"]
    assert _texts(_generate_here(tiny_ckpt, *greedy, "1")) == _texts(
        _generate_here(tiny_ckpt, *greedy, "2")
    )
