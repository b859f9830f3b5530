"""Readers timed side by side for ``bench/store_bench.py`` and ``bench/reader_bench.py``:
``SoftLabelDataset`` and ``Store.iter_decoded`` against raw ``pyarrow.parquet.read_table`` of
the same shards, with the numpy path (no native kernel) next to them."""

from __future__ import annotations

import statistics
import time

import pyarrow.parquet as pq

import kdstore
from kdstore import native
from kdstore.dataset import SoftLabelDataset
from bench._report import paired_ratio


def numpy_path(fn):
    """``fn`` run with the native kernel switched off (``kdstore.native.AVAILABLE`` is read
    at call time), as on a machine where it was not built."""
    def run():
        saved, native.AVAILABLE = native.AVAILABLE, False
        try:
            fn()
        finally:
            native.AVAILABLE = saved
    return run


def reader_study(store: kdstore.Store, *, repeat: int = 9) -> list[list]:
    """Throughput of readers of the same shards, into torch tensors.

    The machine may be shared: all readers are timed back to back in each repeat and the
    best (least disturbed) wall time of each is reported, with the CPU time (all threads of
    the process) as a second, contention-free measure. Ratios are against the default
    (multi-threaded) ``read_table``. With the native kernel built, the numpy path is
    measured in the same run; the last column is :func:`paired_ratio` of the CPU times.
    """
    files = [store.shard_path(s) for s in store.shards]
    P = store.manifest.totals["tokens"]
    E = store.manifest.totals["entries"]

    def raw():
        for f in files:
            pq.read_table(f)

    def raw1():
        for f in files:
            pq.read_table(f, use_threads=False)

    def decoded():
        for d in store.iter_decoded(batch_rows=64):
            d.to_torch()

    def dataset():
        for _ in SoftLabelDataset(store, batch_size=16, seed=0):
            pass

    fns = {"raw": raw, "raw1": raw1, "decoded": decoded, "dataset": dataset}
    if native.AVAILABLE:  # the numpy path side by side (what a machine without a C compiler runs)
        fns.update(decoded_np=numpy_path(decoded), dataset_np=numpy_path(dataset))
    for fn in fns.values():  # warm-up (page cache, lazy imports)
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    best = {k: min(v) for k, v in wall.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    labels = {"raw": "pyarrow.parquet.read_table (raw decode, all columns)", "raw1": "pyarrow.parquet.read_table, use_threads=False",
              "decoded": "Store.iter_decoded -> DecodedRows.to_torch (flat tensors)",
              "dataset": "SoftLabelDataset, shuffled, collated [B,T,K] tensors",
              "decoded_np": "Store.iter_decoded -> to_torch, numpy path (KDSTORE_NATIVE=0)",
              "dataset_np": "SoftLabelDataset, numpy path (KDSTORE_NATIVE=0)"}
    return [[labels[k], P / best[k] / 1e6, E / best[k] / 1e6, best["raw"] / best[k], cpu_med["raw"] / cpu_med[k],
             paired_ratio(cpu["raw"], cpu[k])] for k in fns]
