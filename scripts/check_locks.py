"""Check that each stack's lock file is what pyproject.toml resolves to (``make lint``).

``stacks/pinned.txt`` and ``stacks/current.txt`` are ``uv pip compile`` outputs (the current one
with ``stacks/current-overrides.txt``). A lock is in sync when re-resolving it, with its own
versions as preferences (uv keeps a locked version wherever it still fits), changes nothing
(uv's cache is asked first, the registry only when the cache cannot answer): a pin added, removed or changed in pyproject.toml or the overrides then shows as a diff. Also
checked without the resolver: each stack's direct pins (``==`` in pyproject.toml, replaced by
the overrides for ``current``) are the versions locked. Fix a failure with ``make lock``.

Usage: ``python scripts/check_locks.py [--uv PATH] [--offline]``; exit 1 lists each problem.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
STACKS = ROOT / "stacks"
# Same arguments as the Makefile's `lock` target.
COMPILE = ["pip", "compile", "pyproject.toml", "--extra", "dev", "--universal",
           "--python-version", "3.10", "--quiet"]  # fmt: skip
LOCKS = {"pinned": [], "current": ["--overrides", "stacks/current-overrides.txt"]}


def _pins(lines: list[str]) -> dict[str, str]:
    """``name -> version`` for every ``name==version`` requirement in ``lines``."""
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        if len(spec) == 1 and spec[0].operator == "==":
            out[canonicalize_name(req.name)] = spec[0].version
    return out


def direct_pins(root: Path, stack: str) -> dict[str, str]:
    """The versions a stack must lock: pyproject's ``==`` pins (and the overrides')."""
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = _pins([*project["dependencies"], *project["optional-dependencies"]["dev"]])
    if stack == "current":
        overrides = (root / "stacks/current-overrides.txt").read_text(encoding="utf-8")
        for name, ver in _pins(overrides.splitlines()).items():
            if name in pins or name in ("torch", "torchvision"):
                pins[name] = ver
    return pins


def check_pins(root: Path = ROOT) -> list[str]:
    """Direct pins missing from, or different in, each lock (no resolver needed)."""
    from mpt_train.compat import read_lock

    problems = []
    for stack in LOCKS:
        locked = read_lock(root / "stacks" / f"{stack}.txt")
        for name, want in direct_pins(root, stack).items():
            if locked.get(name) != want:
                problems.append(
                    f"stacks/{stack}.txt: {name} is {locked.get(name, 'missing')}, expected {want}"
                )
    return problems


def check_resolution(uv: str, root: Path = ROOT) -> list[str]:
    """A unified diff per lock that the resolver would change."""
    problems = []
    for stack, extra in LOCKS.items():
        lock = root / "stacks" / f"{stack}.txt"
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / lock.name
            shutil.copy(lock, out)  # the old lock's versions are the resolver's preferences
            cmd = [uv, *COMPILE, *extra, "-o", str(out), "--no-header"]
            # From uv's cache first (seconds; an installed stack has filled it); the registry
            # only when the cache cannot answer (a new package or version).
            run = subprocess.run([*cmd, "--offline"], cwd=root, capture_output=True, text=True)
            if run.returncode:
                run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
            if run.returncode:
                problems.append(f"stacks/{stack}.txt: uv pip compile failed: {run.stderr.strip()}")
                continue
            old = _body(lock.read_text(encoding="utf-8"))
            new = _body(out.read_text(encoding="utf-8"))
        diff = list(difflib.unified_diff(old, new, f"stacks/{stack}.txt", "resolved", n=0))
        if diff:
            problems.append("\n".join(line.rstrip("\n") for line in diff))
    return problems


def _body(text: str) -> list[str]:
    """The lock without uv's header comment (the command that wrote it)."""
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uv", default=shutil.which("uv") or "uv", help="the uv executable")
    parser.add_argument("--offline", action="store_true", help="direct pins only, no resolver")
    args = parser.parse_args(argv)
    problems = check_pins()
    if not args.offline:
        problems += check_resolution(args.uv)
    for p in problems:
        print(p)
    print("locks: ok" if not problems else "locks out of sync with pyproject.toml: run `make lock`")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
