"""What each rank tells the others about itself, through the run's rendezvous store.

A beat is a small JSON record written every second by a thread of each rank: a beat counter
(it stops when the process or its host dies), a count of the training events the rank has
finished (it stops when the rank stalls), the step, the last event, and where the main thread
is right now, including whether it is inside a collective (waiting for other ranks) or not
(working, or stuck on its own: a data read, a hung kernel, a filesystem). Rank 0 compares
counters against its own clock, so clock skew between hosts does not matter.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType

import torch.distributed as tdist

__all__ = ["Beat", "connect_store", "main_thread_location", "peer_label"]

#: Stack frames under this folder are torch.distributed: collectives and FSDP's waits on them.
_COLLECTIVES = str(Path(tdist.__file__).parent)


@dataclass
class Beat:
    """One rank's latest report."""

    rank: int
    node: int
    local_rank: int
    host: str
    beat: int = 0
    events: int = 0
    step: int = 0
    event: str = "start"
    where: str = ""
    in_collective: bool = False
    state: str = "training"  # "training", "done" (fit ended) or "stopped" (ended by an error)

    @classmethod
    def of_this_rank(cls) -> Beat:
        env = os.environ
        return cls(
            rank=int(env.get("RANK", "0")),
            node=int(env.get("NODE_RANK", "0")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            host=socket.gethostname(),
        )

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, text: bytes | str) -> Beat:
        return cls(**json.loads(text))


def peer_label(beat: Beat) -> str:
    """``rank 3 (node 1, local rank 1, host h)``: what an operator needs to find the machine."""
    return f"rank {beat.rank} (node {beat.node}, local rank {beat.local_rank}, host {beat.host})"


def _short(path: str) -> str:
    return "/".join(Path(path).parts[-3:])


def main_thread_location() -> tuple[str, bool]:
    """(innermost ``file:line in function`` of the main thread, whether it is in a collective).

    Read from another thread (``sys._current_frames``, what py-spy and faulthandler show): the
    main thread may be blocked in C for as long as it likes.
    """
    frame: FrameType | None = sys._current_frames().get(threading.main_thread().ident or -1)
    if frame is None:
        return "", False
    where = f"{_short(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}"
    in_collective = False
    while frame is not None:
        if frame.f_code.co_filename.startswith(_COLLECTIVES):
            in_collective = True
            break
        frame = frame.f_back
    return where, in_collective


def connect_store(timeout_s: float) -> tdist.Store | None:
    """A client of the rendezvous store (the TCP store on rank 0's host that
    ``MASTER_ADDR``/``MASTER_PORT`` name), or None when the launcher gave none."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    store = tdist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))
    return tdist.PrefixStore("mpt-train/heartbeat/", store)
