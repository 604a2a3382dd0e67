"""Damaged checkpoints are reported as damaged; exports never mix into someone else's folder."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mpt_train.errors import ConfigError
from mpt_train.export import CheckpointError, export_hf, read_checkpoint
from mpt_train.reliability import check_load_path_trusted, load_weights_safely
from mpt_train.reliability.manifest import MANIFEST_SUFFIX
from mpt_train.reliability.trust import UntrustedCheckpointError
from tests.helpers import REPO

DAMAGE = {
    "empty": lambda data: b"",
    "truncated": lambda data: data[: len(data) // 2],
    "random": lambda data: b"R" + os.urandom(len(data) - 1),  # not a pickle's first byte
}


def damaged(tiny_ckpt: Path, tmp_path: Path, how: str) -> Path:
    """A copy of a trained checkpoint, with its manifest, then damaged."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    copy = folder / tiny_ckpt.name
    copy.write_bytes(DAMAGE[how](tiny_ckpt.read_bytes()))
    manifest = tiny_ckpt.parent / f"{tiny_ckpt.name}{MANIFEST_SUFFIX}"
    shutil.copy(manifest, folder / manifest.name)
    return copy


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_checkpoint_is_named_with_what_its_manifest_expects(
    tiny_ckpt: Path, tmp_path: Path, how: str
) -> None:
    path = damaged(tiny_ckpt, tmp_path, how)
    size = tiny_ckpt.stat().st_size
    expected = f"its manifest {path.name}{MANIFEST_SUFFIX} expects {size} bytes with xxh3_128 "
    for read in (
        lambda: read_checkpoint(path),
        lambda: load_weights_safely(path),
        lambda: check_load_path_trusted(str(path), None, "r", trust=False),
    ):
        with pytest.raises((CheckpointError, UntrustedCheckpointError, ConfigError)) as info:
            read()
        message = str(info.value)
        assert f"{path} is damaged: " in message and expected in message
        assert "trust" not in message  # a damaged file is no question of trust


def test_export_script_reports_a_damaged_checkpoint_in_one_line(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    path = damaged(tiny_ckpt, tmp_path, "truncated")
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts/convert_to_hf.py"), str(path), str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: cannot export {path}: {path} is damaged: not a checkpoint (")
    )
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "hf").exists()


def test_export_refuses_a_folder_holding_other_files(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=rf"{out} holds files this export does not write "
                       r"\(notes\.txt\); .* --overwrite"):  # fmt: skip
        export_hf(tiny_ckpt, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers

    export_hf(tiny_ckpt, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    export_hf(tiny_ckpt, tmp_path / "fresh")
    export_hf(tiny_ckpt, tmp_path / "fresh")  # its own files: a re-export replaces them
    for p in (tmp_path / "fresh").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
