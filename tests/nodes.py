"""Simulated nodes on one machine: Composer's launcher once per node, exactly as on a cluster.

Each "node" is one ``composer --world_size W --node_rank i --master_addr 127.0.0.1
--master_port P -n R`` process (the command a Slurm script runs on every node) with its own
process group, so a test can SIGKILL a whole node (launcher and ranks) the way a machine is
lost. CPU ranks talk over gloo on loopback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from tests.helpers import REPO

__all__ = ["Node", "NodeRun", "free_port", "launch_nodes", "node_cmd", "run_nodes"]


def free_port() -> int:
    """A TCP port free on loopback now (the rendezvous port of one run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_MOUNT_SHM = ["sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$0" "$@"']


@functools.cache
def own_shm() -> list[str]:
    """The prefix that gives a node its own /dev/shm, as a machine has: mosaicml-streaming
    keeps its per-node index and barriers in POSIX shared memory, and two nodes sharing one
    collide. A mount namespace: as root, or through an unprivileged user namespace."""
    for prefix in (["unshare", "--mount"], ["unshare", "--mount", "--map-root-user"]):
        probe = subprocess.run([*prefix, *_MOUNT_SHM, "true"], capture_output=True)
        if probe.returncode == 0:
            return [*prefix, *_MOUNT_SHM]
    pytest.skip(
        "simulated nodes need a /dev/shm each: `unshare --mount` (root) or unprivileged user "
        f"namespaces, neither works here: {probe.stderr.decode(errors='replace').strip()}"
    )


def node_cmd(nodes: int, ranks: int, node_rank: int, port: int) -> list[str]:
    """The launcher command of node ``node_rank`` of ``nodes`` nodes with ``ranks`` ranks each."""
    return [
        *own_shm(),
        sys.executable, "-m", "composer.cli.launcher",
        "--world_size", str(nodes * ranks),
        "--node_rank", str(node_rank),
        "--master_addr", "127.0.0.1",
        "--master_port", str(port),
        "-n", str(ranks),
    ]  # fmt: skip


@dataclass
class Node:
    """One launched node: its launcher process (leader of its own process group) and output."""

    rank: int
    proc: subprocess.Popen
    out: IO[bytes]
    err: IO[bytes]
    exited_at: float | None = None  # wall clock (time.time), comparable across processes

    def kill(self) -> None:
        """SIGKILL every process of the node: the launcher, its ranks and their children."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def text(self) -> tuple[str, str]:
        self.out.seek(0)
        self.err.seek(0)
        return self.out.read().decode(errors="replace"), self.err.read().decode(errors="replace")


@dataclass
class NodeRun:
    """Every node of one launch; ``wait`` collects exit codes and exit times."""

    nodes: list[Node] = field(default_factory=list)

    def wait(self, timeout: float) -> list[int | None]:
        """Wait for every launcher to exit (None: still running at ``timeout``, then killed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.exited_at is None and node.proc.poll() is not None:
                    node.exited_at = time.time()
            if all(n.exited_at is not None for n in self.nodes):
                break
            time.sleep(0.05)
        codes = [n.proc.poll() for n in self.nodes]
        for node in self.nodes:
            node.kill()  # orphans (upload workers) of a node must not outlive the test
            node.proc.wait()
        return codes

    def output(self) -> str:
        parts = []
        for node in self.nodes:
            out, err = node.text()
            parts.append(f"--- node {node.rank} stdout\n{out}\n--- node {node.rank} stderr\n{err}")
        return "\n".join(parts)

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
            node.proc.wait()
            node.out.close()
            node.err.close()


def launch_nodes(
    nodes: int, ranks: int, script_args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> NodeRun:
    """Start ``nodes`` launchers of ``ranks`` ranks each running ``script_args`` (a script and
    its arguments), all output of every rank kept (Composer's launcher drops non-zero ranks'
    unless told where to write it: here, to the node's own output)."""
    port = free_port()
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", **(env or {})}
    full_env.pop("WORLD_SIZE", None)
    run = NodeRun()
    for node_rank in range(nodes):
        # Closed by NodeRun.close: they outlive this call.
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115
        cmd = [
            *node_cmd(nodes, ranks, node_rank, port),
            "--stdout",
            "/dev/stdout",
            "--stderr",
            "/dev/stderr",
        ]
        proc = subprocess.Popen(
            [*cmd, *script_args], cwd=cwd, env=full_env, stdout=out, stderr=err,
            start_new_session=True,
        )  # fmt: skip
        run.nodes.append(Node(node_rank, proc, out, err))
    return run


def run_nodes(
    nodes: int,
    ranks: int,
    script_args: list[str],
    cwd: Path,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> str:
    """Launch, wait, and require every node to exit 0; returns every rank's output."""
    run = launch_nodes(nodes, ranks, script_args, cwd, env)
    try:
        codes = run.wait(timeout)
        text = run.output()
        if any(c != 0 for c in codes):
            raise AssertionError(f"nodes exited {codes} (None: timed out)\n{text[-12000:]}")
        return text
    finally:
        run.close()
