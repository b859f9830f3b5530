"""Store-side parts of ``bench/scale_bench.py``: bytes per kept entry with 18-bit ids, and a
store of 10,000 shards (see that file's docstring; run through it)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._report import markdown_table, write_section

V = 151_936
DISTILLKIT_B_PER_ENTRY = 2.69  # DistillKit's top-k format at this vocabulary (issue #16's anchor)


def _median_seconds(fn, repeat: int = 3) -> float:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


# -- bytes per kept entry -----------------------------------------------------------------------
def bytes_per_entry_study(a) -> None:
    from bench._store_teachers import spread_teacher
    from bench.store_bench import _soft_label_bytes, real_teacher, store_kl, write_kdstore
    from kdstore.hashing import token_hashes
    from kdstore.writer import frequency_order

    t = real_teacher(32_768, train=False, progress=False)
    if t is None:
        print("bytes: the reference teacher is not cached (trainer.lm.reference.reference_teacher()); skipped")
        return
    rows, work = [], Path(tempfile.mkdtemp(prefix="scale-bytes-"))
    for label, tv in ((f"reference teacher ids (V = {t.vocab:,}, 12-bit)", t), (f"spread over V = {V:,} (18-bit ids)", spread_teacher(t, V))):
        vocab = tv.vocab
        hashes = token_hashes(f"<{i}>".encode() for i in range(vocab))
        # What kd cache --index-order frequency does: rank ids by their count among the input tokens.
        freq = frequency_order(np.bincount(tv.tokens, minlength=vocab), vocab)
        for coding, order in (("id (sorted_delta)", None), ("frequency rank (rank_delta, default)", freq)):
            store = write_kdstore(tv, a.k, 8, work / f"v{vocab}-{'id' if order is None else 'rank'}", hashes=hashes,
                                  index_order=order)
            entries = store.manifest.totals["entries"]
            total = sum(s.bytes for s in store.shards)
            kl = float(np.mean(store_kl(tv, a.k, store)))
            soft = sum(_soft_label_bytes(store.shard_path(sh)) for sh in store.shards)
            order_b = (store.manifest.index_order or {}).get("bytes", 0)
            rows.append([label, coding, f"{total / entries:.3f}", f"{soft / entries:.3f}",
                         f"{total / store.manifest.totals['tokens']:.1f}", f"{order_b:,}" if order_b else "-", f"{kl:.2e}"])
    table = markdown_table(["ids", "index coding", "B per kept entry (whole shard)", "B per kept entry (soft-label columns)",
                            "B per position", "index_order.parquet B (once per store)", "KL to teacher (nats/position)"], rows)
    print(table)
    if a.record:
        body = (f"{t.label}: {len(t.tokens):,} positions, top-{a.k}, sqrt 8-bit code, zstd. To get real distributions "
                f"at a 150k vocabulary without a hub, each of the teacher's {t.vocab:,} ids is sent to a distinct row of "
                f"a {V:,}-row vocabulary by a fixed random permutation (seed 0), for the kept indices and the input "
                f"tokens alike. That is the hard case for ids stored as they are: a random permutation leaves no "
                f"locality for the gaps. Each vocabulary is stored twice from the same rows: ids as they are "
                f"(`--index-order id`, format v1's coding) and ids as their rank by input-token frequency "
                f"(`--index-order frequency`, the default of `kd cache`; the order is counted over the stored "
                f"positions' input tokens, as the capture's driver counts the input it is about to capture, and "
                f"kept in `index_order.parquet` once per store: unseen ids keep their id order, so the file is small; "
                f"it is not in the per-entry columns, and on this 1M-entry store it would add about 0.01 B per entry). "
                f"The KL column is identical because the codes are: only the index column changes. Not measured here: "
                f"a real 150k teacher spreads its top-{a.k} over more, rarer ids than this 4k teacher does, so its "
                f"ranks' gaps would be somewhat larger than these.\n\n{table}\n\n"
                f"Target: at most 2.0 B per kept entry at k = {a.k} with 18-bit ids, against DistillKit's "
                f"{DISTILLKIT_B_PER_ENTRY} at this vocabulary.")
        write_section("scale-bytes", f"Bytes per kept entry at V = {V:,} (18-bit ids)", body,
                      command=f"python bench/scale_bench.py bytes --k {a.k}")


# -- a store of 10,000 shards ------------------------------------------------------------------
def make_big_store(path: Path, *, shards: int, rows: int, progress: bool = True) -> None:
    """A synthetic store (random top-4 rows of 4 positions, V = 151,936) of ``shards`` shards
    holding ``rows`` rows in all: one template shard re-written with fresh sample ids."""
    import pyarrow as pa
    from tqdm import tqdm

    import kdstore
    from kdstore import Selection, SoftLabelRow, StoreWriter, TeacherInfo
    from kdstore.hashing import token_hashes
    from kdstore.writer import ShardWriter, finalize, vocab_table

    per = rows // shards
    rng = np.random.default_rng(0)
    vocab = vocab_table(ids=list(range(V)), tokens=[f"<{i}>" for i in range(V)],
                        token_bytes=[f"<{i}>".encode() for i in range(V)], special=[False] * V)
    hashes = token_hashes(f"<{i}>".encode() for i in range(V))
    tmpl_dir = path.parent / (path.name + "-template")
    with StoreWriter(str(tmpl_dir), teacher=TeacherInfo(name_or_path="synthetic-10k-shards", vocab_size=V),
                     selection=Selection(mode="topk", k=4), overwrite=True, row_group_rows=per,
                     pipeline={"tool": "bench/scale_store.py", "synthetic": True}) as w:
        w.write_vocab(vocab)
        p = rng.dirichlet(np.ones(5), size=(per, 4)).astype(np.float32)
        w.write([SoftLabelRow(sample_id=f"{r:016x}", tokens=hashes[rng.integers(0, V, 4)], counts=np.full(4, 4),
                              indices=np.concatenate([np.sort(rng.choice(V, 4, replace=False)) for _ in range(4)]),
                              probs=p[r, :, :4].ravel(), tail=p[r, :, 4]) for r in range(per)])
    tmpl = kdstore.open(str(tmpl_dir))
    table = tmpl.read_shard(0).cast(tmpl.schema)
    manifest = tmpl.manifest
    loc = kdstore.fs.resolve(str(path))
    loc.makedirs("shards")
    loc.write_bytes_atomic("vocab.parquet", tmpl_dir.joinpath("vocab.parquet").read_bytes())
    infos = []
    for s in tqdm(range(shards), desc="write shards", disable=not progress):
        ids = pa.array([f"{s * per + r:016x}" for r in range(per)], pa.string())
        sw = ShardWriter(location=loc, rel_path=f"shards/part-{s:06d}.parquet", manifest=manifest)
        sw.write_table(table.set_column(0, table.schema.field(0), ids))
        infos.append(sw.close())
    finalize(loc, manifest, shards=infos, vocab=tmpl.manifest.vocab)


def big_store_study(a) -> None:
    import kdstore
    from kdstore.dataset import SoftLabelDataset, StoreLoader
    from kdstore.tools import verify_store
    from pipelines.sinks import scan_shards

    path = Path(a.cache) / f"store-{a.shards}x{a.rows // a.shards}"
    if not (path / "manifest.json").exists():
        t0 = time.perf_counter()
        make_big_store(path, shards=a.shards, rows=a.rows)
        print(f"generated in {time.perf_counter() - t0:.0f} s")
    store = kdstore.open(str(path))
    m = store.manifest
    disk = sum(s.bytes for s in m.shards)
    t_open = _median_seconds(lambda: kdstore.open(str(path)))
    t0 = time.perf_counter()
    problems = verify_store(store, workers=0)
    t_verify = time.perf_counter() - t0
    t0 = time.perf_counter()
    verify_store(store, workers=1)
    t_verify1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = scan_shards(store.location, m)
    t_scan = time.perf_counter() - t0

    def first_batch(workers: int) -> float:
        t0 = time.perf_counter()
        ds = SoftLabelDataset(store, batch_size=16, seed=0)
        next(iter(StoreLoader(ds, num_workers=workers) if workers else ds))
        return time.perf_counter() - t0

    t_first0, t_first2 = first_batch(0), first_batch(2)
    rows = [
        ["shards / rows / positions", f"{len(m.shards):,} / {m.totals['rows']:,} / {m.totals['tokens']:,}"],
        ["bytes on disk (shards)", f"{disk / 2**20:,.0f} MiB"],
        ["manifest.json size", f"{store.location.size('manifest.json') / 2**20:.2f} MiB"],
        ["`kdstore.open` (median of 3)", f"{t_open:.2f} s"],
        ["`kd store verify` (threads = min(8, cores))", f"{t_verify:.1f} s ({'OK' if not problems else problems[0]})"],
        ["`kd store verify --workers 1`", f"{t_verify1:.1f} s"],
        ["resume scan (`pipelines.sinks.scan_shards`)", f"{t_scan:.1f} s ({len(state.shards):,} shards kept)"],
        ["`SoftLabelDataset` first batch (in-process)", f"{t_first0:.2f} s"],
        ["`StoreLoader(num_workers=2)` first batch", f"{t_first2:.2f} s"],
    ]
    table = markdown_table(["measure", "value"], rows)
    print(table)
    if a.record:
        body = (f"A **synthetic** store (random top-4 rows of 4 positions at V = {V:,}; one template shard written "
                f"{a.shards:,} times with fresh sample ids), labelled `synthetic` in its manifest's pipeline "
                f"entry.\n\n{table}")
        write_section("scale-store", f"A store of {a.shards:,} shards and {a.rows:,} rows", body,
                      command=f"python bench/scale_bench.py store --shards {a.shards} --rows {a.rows}")
