"""Background loading of a worker's shards, in the order its batches need them."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from kdstore.rows import RawRows


class ShardPrefetcher:
    """Loads shards in a fixed order in ``threads`` background threads, ``ahead`` shards
    beyond the last one requested (pyarrow reading and the native kernel release the GIL, so
    reading the next shards overlaps decoding the current batches). Memory: the shards in use
    plus ``ahead`` (one shuffle block) loaded in advance, whatever the number of threads."""

    def __init__(self, load, order: list[int], *, ahead: int, threads: int = 1) -> None:
        self._load = load
        self._order = order
        self._pos = {s: n for n, s in enumerate(order)}
        self._ahead = ahead
        self._next = 0  # position in ``order`` of the next shard to submit
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kdstore-shards") if order else None
        self._futures: dict[int, Future] = {}
        # Shards whose load finished and was collected: a batch draws on ~4 shards and each
        # shard serves ~30 batches, so most gets are this dict's (Future.result takes a lock,
        # ~5 us per call of main-thread CPU while the read threads run).
        self._ready: dict[int, RawRows] = {}

    def _top_up(self, upto: int) -> None:
        while self._next < len(self._order) and self._next <= upto:
            s = self._order[self._next]
            self._futures[s] = self._pool.submit(self._load, s)
            self._next += 1

    def get(self, shard: int) -> RawRows:
        raw = self._ready.get(shard)
        if raw is None:
            # First request of this shard: the furthest position requested so far moves here
            # (a repeated request of a shard cannot move it), so top up before waiting.
            self._top_up(self._pos[shard] + self._ahead)
            raw = self._ready[shard] = self._futures[shard].result()  # a failed load raises again on retry
            del self._futures[shard]
        return raw

    def drop(self, shard: int) -> None:
        self._futures.pop(shard, None)
        self._ready.pop(shard, None)

    def close(self) -> None:
        if self._pool is not None:
            for f in self._futures.values():
                f.cancel()
            self._pool.shutdown(wait=True)
            self._futures.clear()
        self._ready.clear()
