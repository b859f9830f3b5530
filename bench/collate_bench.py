"""Collator benchmark: joining a user's dataset to a store by sample_id (kdstore.collate)
against streaming the store in its own order (kdstore.SoftLabelDataset), same store, one run.

The store is SYNTHETIC (stratified random top-k indices, random probabilities): the join's
cost does not depend on the values. Rows per second include decoding and padding into
``[B, L, K]`` tensors; the collator also checks every example's tokens against the store.
Cases: the dataset in store order, and shuffled (what a Trainer's sampler does) with a row-group
cache that holds the whole store or 1/8 of it (a store much larger than the cache).

Usage: ``python bench/collate_bench.py [--rows 2000] [--len 128] [--k 32] [--no-doc]``
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import kdstore  # noqa: E402
from bench._report import markdown_table, write_section  # noqa: E402
from kdstore.collate import StoreCollator, StoreOrderSampler  # noqa: E402


def make_store(path: Path, *, rows: int, length: int, k: int, vocab: int, row_group_rows: int) -> kdstore.Store:
    rng = np.random.default_rng(0)
    toks = [f"t{i}" for i in range(vocab)]
    vt = kdstore.vocab_table(ids=list(range(vocab)), tokens=toks, token_bytes=[t.encode() for t in toks], special=[False] * vocab)
    hashes = vt.column("hash").to_numpy()
    stride = vocab // k
    with kdstore.StoreWriter(str(path), teacher=kdstore.TeacherInfo(name_or_path="synthetic", vocab_size=vocab),
                             selection=kdstore.Selection(mode="topk", k=k), row_group_rows=row_group_rows) as w:
        w.write_vocab(vt)
        for r in range(rows):
            idx = rng.integers(0, stride, (length, k)) + np.arange(k) * stride  # unique per position
            p = rng.random((length, k)) ** 4
            p = 0.9 * p / p.sum(1, keepdims=True)
            w.write([kdstore.SoftLabelRow(sample_id=f"{r:016x}", tokens=hashes[rng.integers(0, vocab, length)],
                                          counts=np.full(length, k), indices=idx.ravel(), probs=p.ravel(),
                                          tail=np.full(length, 0.1))])
    return kdstore.open(str(path))


def feats_of(store: kdstore.Store) -> list[dict]:
    """The "user's dataset": one example per store row, tokens from the store itself."""
    feats = []
    for d in store.iter_decoded():
        for r in range(d.num_rows):
            a, b = d.positions[r], d.positions[r + 1]
            feats.append({"sample_id": d.sample_id[r], "window": int(d.window[r]), "input_ids": d.input_ids[a:b].tolist()})
    return feats


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--len", type=int, default=128, dest="length")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--row-group-rows", type=int, default=128)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "s", rows=args.rows, length=args.length, k=args.k, vocab=args.vocab,
                           row_group_rows=args.row_group_rows)
        groups = sum(store.open_shard(i).metadata.num_row_groups for i in range(len(store.shards)))
        probe = StoreCollator(store)
        probe(feats_of(store)[:1])
        # Memory of the whole store in the cache (undecoded codes), from one loaded group.
        store_bytes = probe._cached_bytes * groups
        feats = feats_of(store)
        shuffled = feats[:]
        random.Random(0).shuffle(shuffled)
        sampler = StoreOrderSampler(StoreCollator(store), [f["sample_id"] for f in feats], [f["window"] for f in feats],
                                    seed=0, block_groups=max(1, groups // 8))
        blocked = [feats[i] for i in sampler]
        B = args.batch

        def stream(shuffle: bool):
            for _ in kdstore.SoftLabelDataset(store, batch_size=B, shuffle=shuffle, seed=0):
                pass

        def join(order, cache):
            coll = StoreCollator(store, cache_bytes=cache)
            for s in range(0, len(order), B):
                coll(order[s : s + B])

        t_index = min(timed(lambda: StoreCollator(store)) for _ in range(2))
        cases = [
            ("SoftLabelDataset, store order (baseline)", lambda: stream(False)),
            ("SoftLabelDataset, shuffled blocks", lambda: stream(True)),
            ("StoreCollator, dataset in store order", lambda: join(feats, 1 << 30)),
            ("StoreCollator, shuffled, cache holds the store", lambda: join(shuffled, 1 << 30)),
            ("StoreCollator, shuffled, cache 1/8 of the store", lambda: join(shuffled, store_bytes // 8)),
            ("StoreCollator, StoreOrderSampler (blocks of 2 groups), cache 1/8", lambda: join(blocked, store_bytes // 8)),
        ]
        rows_out = []
        base = None
        for name, fn in cases:
            t = min(timed(fn) for _ in range(2))
            rps = len(feats) / t
            base = base or rps
            rows_out.append([name, rps, rps * args.length, rps / base])
            print(f"{name:<58} {rps:10.0f} rows/s  {rps / base:5.2f}x", flush=True)
    table = markdown_table(["case", "rows/s", "positions/s", "vs baseline"], rows_out)
    body = (
        f"{args.rows:,} rows of {args.length} positions, top-{args.k}, V = {args.vocab:,}, sqrt8 codes, "
        f"{args.row_group_rows} rows per row group ({groups} groups, {store_bytes / 2**20:.1f} MiB in the cache), batches of {B}, 1 torch thread; each case the "
        f"best of 2 passes, side by side in one run (shared machine: absolute numbers are noisy, ratios less so). "
        f"Building the collator's (sample_id, window) index: {t_index * 1e3:.0f} ms "
        f"({t_index / args.rows * 1e6:.1f} us/row).\n\n{table}\n\n"
        "The collator pays for the join (one row-group read per cache miss) and for checking every example's "
        "tokens against the store. With a cache smaller than the store, a shuffled pass re-reads a row group for "
        "almost every row: size `cache_bytes` to the store, order the dataset with `StoreOrderSampler` (shuffled blocks of row "
        "groups that fit the cache; `KDTrainer(store_order=True)`), or stream large stores with `SoftLabelDataset`."
    )
    print(body)
    if not args.no_doc:
        write_section("collate", "Joining a dataset to a store by sample_id (StoreCollator)", body)


if __name__ == "__main__":
    main()
