"""Rank 0's judgement of heartbeats, on a real rendezvous store, at chosen instants.

The multi-process runs (tests/train/test_multinode.py, test_stalled_rank.py) show it end to end; this pins down who is named for
what: a rank whose beats stop is lost, a rank that beats but makes no progress outside a
collective is the one the others wait for, and it is said once per stall.
"""

from __future__ import annotations

import logging

import pytest
import torch.distributed as tdist

from mpt_train.reliability.heartbeat import Beat, connect_store
from mpt_train.reliability.watchdog import RankWatchdog
from tests.nodes import free_port


@pytest.fixture
def watchdog(monkeypatch: pytest.MonkeyPatch) -> RankWatchdog:
    port = free_port()
    server = tdist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("RANK", "0")
    dog = RankWatchdog(straggler_timeout_s=10)
    dog.world, dog.store = 3, connect_store(5)
    dog.server = server  # kept alive as long as the watchdog
    return dog


def publish(dog: RankWatchdog, beats: dict[int, Beat]) -> None:
    for rank, beat in beats.items():
        dog.store.set(str(rank), beat.dumps())


def test_lost_and_stalled_ranks_are_named(watchdog: RankWatchdog, caplog) -> None:
    beats = {r: Beat(rank=r, node=r // 2, local_rank=r % 2, host="h", beat=1, events=9)
             for r in range(3)}  # fmt: skip
    beats[0].in_collective = beats[2].in_collective = True
    beats[1].where = "data/reader.py:12 in read"
    publish(watchdog, beats)
    with caplog.at_level(logging.WARNING, logger="mpt_train.reliability.watchdog"):
        watchdog._judge(now=100.0)
        assert not caplog.records, "nothing is late yet"
        for r in (0, 1):  # ranks 0 and 1 still beat; rank 2 went silent
            beats[r].beat += 1
        publish(watchdog, {0: beats[0], 1: beats[1]})
        watchdog._judge(now=111.0)
        watchdog._judge(now=112.0)  # said once per stall
        text = [r.getMessage() for r in caplog.records]
        assert len(text) == 2, text
        assert text[0].startswith("rank 2 (node 1, local rank 0, host h) stopped answering")
        assert text[1].startswith("rank 1 (node 0, local rank 1, host h) has made no progress")
        assert "data/reader.py:12 in read" in text[1]
        assert "ranks [0] wait for it in a collective" in text[1]

        beats[1].events += 1
        publish(watchdog, {1: beats[1]})
        watchdog._judge(now=113.0)
        assert (
            caplog.records[-1]
            .getMessage()
            .startswith("rank 1 (node 0, local rank 1, host h) moves again after 13 s")
        )
