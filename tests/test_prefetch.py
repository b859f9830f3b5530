"""ShardPrefetcher: each shard loaded once, in order, at most ``ahead`` beyond the last one
requested; dropped shards released; a failed load raises on every request."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from kdstore.prefetch import ShardPrefetcher


class Loaded:
    """Stands in for a shard's RawRows (weak-referenceable, so release can be checked)."""

    def __init__(self, shard: int) -> None:
        self.shard = shard


class Recorder:
    """A load function that records which shards were asked for, in order; shards in
    ``fail`` raise as a corrupt shard does."""

    def __init__(self, fail: frozenset[int] = frozenset()) -> None:
        self.calls: list[int] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, shard: int) -> Loaded:
        with self.lock:
            self.calls.append(shard)
        if shard in self.fail:
            raise ValueError(f"shard {shard} is corrupt")
        return Loaded(shard)


def test_each_shard_is_loaded_once_however_often_batches_ask_for_it():
    load = Recorder()
    p = ShardPrefetcher(load, [3, 1, 2, 0], ahead=1, threads=1)
    try:
        for s in [3, 1, 3, 1, 3, 2, 1, 2, 0, 2, 0]:  # batches draw on shards again and again
            assert p.get(s).shard == s
    finally:
        p.close()
    assert sorted(load.calls) == [0, 1, 2, 3]
    assert load.calls == [3, 1, 2, 0]  # one thread: loads start in the order given


def test_loads_run_at_most_ahead_beyond_the_last_shard_requested():
    load = Recorder()
    order = list(range(10))
    p = ShardPrefetcher(load, order, ahead=2, threads=1)
    try:
        p.get(0)
        p.get(0)
        assert len(p._futures) + len(p._ready) == 3  # shard 0 and the two ahead of it, no more
        p.get(1)
        p.get(0)  # an earlier shard again: nothing new is submitted
        assert {*p._futures, *p._ready} == {0, 1, 2, 3}
    finally:
        p.close()


def test_a_dropped_shard_is_released():
    p = ShardPrefetcher(Recorder(), [0, 1], ahead=1, threads=1)
    try:
        ref = weakref.ref(p.get(0))
        p.drop(0)
        gc.collect()
        assert ref() is None
        assert p.get(1).shard == 1
    finally:
        p.close()


def test_a_failed_load_raises_on_every_request():
    p = ShardPrefetcher(Recorder(fail=frozenset({1})), [0, 1], ahead=1, threads=2)
    try:
        assert p.get(0).shard == 0
        for _ in range(2):
            with pytest.raises(ValueError, match="shard 1 is corrupt"):
                p.get(1)
    finally:
        p.close()
