"""Name the rank that holds a run up: a stalled rank while it stalls, a lost one when it dies.

Synchronous data parallelism turns one bad rank into every rank waiting in a collective until
the collective timeout, and the error each survivor then prints ("connection closed by peer",
"timed out") names a socket, not the machine to drain. Every rank publishes a
:class:`~mpt_train.reliability.heartbeat.Beat`; rank 0 reads them all each second and logs

* a warning when a rank that is alive has finished no training event for
  ``reliability.straggler_timeout_s``, with where it is and which ranks wait for it, and a
  line when it moves again;
* an error when a rank's beats stop (its process died or its host is unreachable).

Every rank whose run ends with an error looks once more before it exits (waiting up to the
loss threshold for a dead rank's beats to go stale), so the last lines of a failed multi-node
run say which rank or node stopped answering: often the first rank to fail is not rank 0 but a
neighbour of the lost node, whose closed connection ends its collective at once, and its
launcher then stops rank 0 before rank 0's own watch has seen five missed beats.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as tdist
from composer.core import Callback, Event, State
from composer.loggers import Logger

from mpt_train.reliability.heartbeat import Beat, connect_store, main_thread_location, peer_label

__all__ = ["RankWatchdog"]

log = logging.getLogger(__name__)

#: Seconds between beats; a rank is lost after this many missed beats.
BEAT_S = 1.0
LOST_AFTER_BEATS = 5
#: Beats in a row that fail to reach the store before a rank counts rank 0's host as lost.
STORE_FAILURES = 2


@dataclass
class _Seen:
    """What rank 0 last saw of a peer, timed by rank 0's own clock."""

    beat: Beat
    beat_at: float
    progress_at: float
    stall_reported: bool = False
    lost_reported: bool = False


class RankWatchdog(Callback):
    """Heartbeat on every rank; on rank 0 (and on any rank whose run fails), the judge."""

    def __init__(self, straggler_timeout_s: float | None, store_timeout_s: float = 10.0) -> None:
        self.straggler_timeout_s = straggler_timeout_s
        self.store_timeout_s = store_timeout_s
        self.me = Beat.of_this_rank()
        self.world = 1
        self.store: Any = None
        self.seen: dict[int, _Seen] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.rank0_state = "training"

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        with self._lock:  # every finished event is progress
            self.me.events += 1
            self.me.step = int(state.timestamp.batch)
            self.me.event = event.value
        super().run_event(event, state, logger)

    def fit_start(self, state: State, logger: Logger) -> None:
        self.world = tdist.get_world_size() if tdist.is_initialized() else 1
        if self.world == 1 or self._thread is not None:
            return
        self.store = connect_store(self.store_timeout_s)
        if self.store is None:
            return
        self._publish()
        self._thread = threading.Thread(target=self._loop, name="rank-watchdog", daemon=True)
        self._thread.start()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._finish("done")

    def close(self, state: State, logger: Logger) -> None:
        if self._thread is None or self.me.state != "training":
            return  # never started, or the fit ended (closing twice changes nothing)
        self._finish("stopped")
        self._explain_failure()

    def _finish(self, how: str) -> None:
        if self._thread is None or self.me.state != "training":
            return
        self._stop.set()
        self._thread.join()
        self.me.state = how
        self._publish()
        if how == "done" and self.me.rank == 0:
            self._judge(time.monotonic())  # a stall that ended in the last second: say so

    def _publish(self) -> None:
        with self._lock:
            self.me.beat += 1
            self.me.where, self.me.in_collective = main_thread_location()
            text = self.me.dumps()
        self.store.set(str(self.me.rank), text)

    def _loop(self) -> None:
        failures = 0
        while not self._stop.wait(BEAT_S):
            try:
                self._publish()
                if self.me.rank == 0:
                    self._judge(time.monotonic())
                else:  # rank 0 finishing first is no failure (see _store_lost)
                    self.rank0_state = Beat.loads(self.store.get("0")).state
                failures = 0
            except Exception as err:
                failures += 1
                if failures < STORE_FAILURES or self._stop.is_set():
                    continue
                self._store_lost(err)
                return

    def _store_lost(self, err: Exception) -> None:
        """Rank 0's process hosts the store: without it no collective can complete. A rank
        blocked inside one in C++ would not even act on the launcher's SIGTERM (Python runs
        signal handlers between bytecodes), and the launcher waits 30 s before SIGKILL: end
        this rank now, saying why. (Not when rank 0 had finished its fit: it may exit first.)"""
        if self.rank0_state == "done":
            return
        log.error(
            "rank %d lost the rendezvous store on rank 0's host (node 0): %s; node 0 stopped "
            "answering or the network to it is down: ending this rank",
            self.me.rank,
            err,
        )
        if self.me.rank != 0:
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(1)

    def _read(self, now: float) -> None:
        keys = [str(r) for r in range(self.world)]
        present = [k for k in keys if self.store.check([k])]
        for text in self.store.multi_get(present):
            beat = Beat.loads(text)
            old = self.seen.get(beat.rank)
            if old is None:
                self.seen[beat.rank] = _Seen(beat, now, now)
                continue
            if beat.beat != old.beat.beat:
                old.beat_at = now
            if beat.events != old.beat.events or beat.state != "training":
                if old.stall_reported and beat.state != "stopped":
                    log.warning(
                        "%s moves again after %.0f s (%d steps done)",
                        peer_label(beat),
                        now - old.progress_at,
                        beat.step,
                    )
                old.progress_at = now
                old.stall_reported = False
            old.beat = beat

    def _lost(self, now: float) -> list[_Seen]:
        return [
            s
            for s in self.seen.values()
            if s.beat.state == "training" and now - s.beat_at > LOST_AFTER_BEATS * BEAT_S
        ]

    def _judge(self, now: float) -> None:
        self._read(now)
        for seen in self._lost(now):
            if not seen.lost_reported:
                seen.lost_reported = True
                log.error(
                    "%s stopped answering: no heartbeat for %.0f s (%d steps done, last event %s); its "
                    "process died or its host is unreachable",
                    peer_label(seen.beat),
                    now - seen.beat_at,
                    seen.beat.step,
                    seen.beat.event,
                )
        limit = self.straggler_timeout_s
        if limit is None:
            return
        stalled = [
            s
            for s in self.seen.values()
            if s.beat.state == "training" and not s.lost_reported and now - s.progress_at > limit
        ]
        fresh = [s for s in stalled if not s.stall_reported]
        if fresh:
            self._report_stall(stalled, now)
            for s in stalled:
                s.stall_reported = True

    def _report_stall(self, stalled: list[_Seen], now: float) -> None:
        waiting = sorted(s.beat.rank for s in stalled if s.beat.in_collective)
        stuck = [s for s in stalled if not s.beat.in_collective]
        for s in stuck:
            log.warning(
                "%s has made no progress for %.0f s (reliability.straggler_timeout_s=%g): "
                "%d steps done, last event %s, now at %s%s",
                peer_label(s.beat),
                now - s.progress_at,
                self.straggler_timeout_s,
                s.beat.step,
                s.beat.event,
                s.beat.where,
                f"; ranks {waiting} wait for it in a collective" if waiting else "",
            )
        if not stuck:
            log.warning(
                "ranks %s have waited in a collective for %.0f s (%d steps done): the rank they wait "
                "for is not among those reporting",
                waiting,
                now - min(s.progress_at for s in stalled),
                max(s.beat.step for s in stalled),
            )

    def _explain_failure(self) -> None:
        """The run is ending with an error: name the ranks that stopped answering, waiting
        long enough for a dead rank's beats to go stale."""
        deadline = time.monotonic() + (LOST_AFTER_BEATS + 1) * BEAT_S
        try:
            while True:
                now = time.monotonic()
                self._read(now)
                lost = self._lost(now)
                stopped = [s for s in self.seen.values() if s.beat.state != "training"]
                if lost or now > deadline or len(stopped) == self.world:
                    break
                time.sleep(BEAT_S / 4)
        except Exception as err:
            log.error("rank %d cannot reach rank 0's host (node 0): %s", self.me.rank, err)
            return
        for seen in lost:
            log.error(
                "%s stopped answering: no heartbeat for %.0f s (%d steps done, last event %s)",
                peer_label(seen.beat),
                now - seen.beat_at,
                seen.beat.step,
                seen.beat.event,
            )
        alive_stuck = [
            s
            for s in self.seen.values()
            if s.beat.state == "training" and s not in lost and not s.beat.in_collective
        ]
        for seen in alive_stuck:
            log.error(
                "%s is alive but was not in a collective when this run failed (%d steps done), at %s",
                peer_label(seen.beat),
                seen.beat.step,
                seen.beat.where,
            )
