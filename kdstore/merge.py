"""``kd store merge OUT STORE...``: one store from stores written by separate capture jobs.

A corpus of billions of tokens is captured in pieces (one Dataflow job per part, or a
second job for new input); merging makes one store of them. The sources must agree on
everything that gives a stored number its meaning: teacher identity (name, revision,
weights hash, tokenizer hash, padded vocabulary size), selection, temperature,
quantization, level, optional columns, format version, index coding and index order,
hash functions and the vocabulary table itself. A difference is refused with its name and both values.

What the output holds:

* every row of every source exactly once by ``sample_id``: the first occurrence wins, in
  the order the stores are given (then shard order, then row order); later duplicates are
  dropped and counted (``totals.duplicates_dropped``), so
  ``rows in = rows out + duplicates dropped``;
* shards: a source shard without duplicates is taken whole, by ``copy`` (bytes streamed
  and checked against the source manifest's checksum on the way) or by ``link`` (a hard
  link: no new bytes; local disk only, same filesystem; the checksum is still checked). A
  shard with a duplicate is rewritten without those rows, with the same Parquet settings;
* the vocabulary table (and index order) of the first source (all are identical), every dead-letter file
  (renamed ``errors/sNNN-*``, counts summed);
* a manifest written last, atomically, whose ``pipeline`` lists the sources.

A merge that fails part way leaves no manifest: the output is then an incomplete store
that readers reject, never a partial one that looks whole.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import xxhash

from kdstore import format as F
from kdstore._version import __version__
from kdstore.errors import CorruptShardError, StoreError
from kdstore.fs import Location, resolve
from kdstore.hashing import CHECKSUM, file_checksum
from kdstore.store import Store, open as open_store
from kdstore.writer import ShardWriter, finalize

SHARD_MODES = ("copy", "link")
_COPY_CHUNK = 8 << 20


class MergeError(StoreError):
    """The stores cannot be merged (incompatible, or the output is not empty)."""


@dataclass
class MergeReport:
    """What a merge did; ``rows_in == rows_out + duplicates``."""

    out: str
    sources: list[str]
    rows_in: int = 0
    rows_out: int = 0
    duplicates: int = 0
    shards_taken: int = 0
    shards_rewritten: int = 0
    dead_letters: int = 0
    bytes_written: int = 0
    shard_mode: str = "copy"
    per_source: list[dict[str, int]] = field(default_factory=list)


# -- compatibility ---------------------------------------------------------------------------
def identity(m: F.Manifest) -> dict[str, Any]:
    """The manifest fields two stores must share to be merged, flattened to ``a.b`` keys."""
    out: dict[str, Any] = {"format_version": m.format_version, "level": m.level, "index_coding": m.index_coding,
                           "index_dtype": m.index_dtype, "vocab.checksum": (m.vocab or {}).get("checksum"),
                           "index_order.checksum": (m.index_order or {}).get("checksum")}
    for group, obj in (("teacher", m.teacher), ("selection", m.selection), ("quantization", m.quantization)):
        for k, v in asdict(obj).items():
            # The parameter count is descriptive: weights_hash already pins the weights.
            if (group, k) != ("teacher", "num_parameters"):
                out[f"{group}.{k}"] = v
    for k, v in sorted(m.columns.items()):
        out[f"columns.{k}"] = v
    for k, v in sorted(m.hashes.items()):
        out[f"hashes.{k}"] = v
    return out


def check_compatible(stores: Sequence[Store]) -> None:
    """Raise :class:`MergeError` naming the first field on which a store differs from the first."""
    ref = identity(stores[0].manifest)
    for s in stores[1:]:
        got = identity(s.manifest)
        for key in sorted(set(ref) | set(got)):
            if ref.get(key) != got.get(key):
                raise MergeError(
                    f"cannot merge {s.uri} into {stores[0].uri}: they differ in {key} "
                    f"({ref.get(key)!r} vs {got.get(key)!r}); merged stores need the same teacher, tokenizer, "
                    f"selection, temperature and quantization — re-capture one of them with the other's settings"
                )


# -- dedupe ----------------------------------------------------------------------------------
def _id_keys(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """``sample_id`` strings -> ``[N, 2]`` uint64 keys (xxh3-128 of the UTF-8; exact for
    equality short of a 2**-128 collision), so 10M ids dedupe in numpy, not in a Python set."""
    out = np.empty((len(ids), 2), dtype=np.uint64)
    for i, s in enumerate(ids.to_pylist()):
        d = xxhash.xxh3_128_intdigest(s.encode("utf-8"))
        out[i, 0], out[i, 1] = d >> 64, d & 0xFFFFFFFFFFFFFFFF
    return out


def first_occurrence(keys: np.ndarray) -> np.ndarray:
    """``keys [N, 2]`` in priority order -> bool ``[N]``: True where a key is seen first."""
    if len(keys) == 0:
        return np.zeros(0, dtype=bool)
    rec = np.ascontiguousarray(keys).view([("hi", np.uint64), ("lo", np.uint64)]).ravel()
    _, first = np.unique(rec, return_index=True)
    keep = np.zeros(len(keys), dtype=bool)
    keep[first] = True
    return keep


# -- shard transfer --------------------------------------------------------------------------
def _copy_verified(src: Store, shard: F.ShardInfo, dst: Location, rel: str) -> None:
    """Stream a shard into ``dst/rel``, hashing on the way; a mismatch removes the copy."""
    h = xxhash.xxh3_128()
    path = dst.join(rel)
    with src.location.fs.open_input_stream(src.shard_path(shard)) as fin, dst.fs.open_output_stream(path) as fout:
        while True:
            b = fin.read(_COPY_CHUNK)
            if not b:
                break
            h.update(b)
            fout.write(b)
    if f"{CHECKSUM}:{h.hexdigest()}" != shard.checksum:
        dst.fs.delete_file(path)
        raise CorruptShardError(
            f"{src.uri}/{shard.file}: checksum does not match its manifest; the source shard is corrupt — "
            f"run 'kd store verify {src.uri}' and re-capture it (with --resume) before merging"
        )


def _link_verified(src: Store, shard: F.ShardInfo, dst: Location, rel: str) -> None:
    if not (src.location.is_local and dst.is_local):
        raise MergeError(f"--shards link needs local stores ({src.uri} -> {dst.uri}); use --shards copy "
                         f"(object stores copy server-side or stream)")
    with src.location.fs.open_input_stream(src.shard_path(shard)) as f:
        if file_checksum(f) != shard.checksum:
            raise CorruptShardError(
                f"{src.uri}/{shard.file}: checksum does not match its manifest; the source shard is corrupt — "
                f"run 'kd store verify {src.uri}' and re-capture it before merging"
            )
    try:
        os.link(src.shard_path(shard), dst.join(rel))
    except OSError as exc:
        raise MergeError(f"cannot hard-link {src.uri}/{shard.file} into {dst.uri} ({exc.strerror}); "
                         f"the stores must be on one filesystem for --shards link, otherwise use --shards copy") from exc


def _rewrite(src: Store, i: int, keep: np.ndarray, dst: Location, rel: str, manifest: F.Manifest) -> F.ShardInfo:
    """Write shard ``i`` of ``src`` without the rows where ``keep`` is False, row group by row group."""
    pf = src.open_shard(i)
    w = ShardWriter(location=dst, rel_path=rel, manifest=manifest)
    try:
        start = 0
        for rg in range(pf.metadata.num_row_groups):
            t = pf.read_row_group(rg)
            part = keep[start:start + t.num_rows]
            start += t.num_rows
            if part.any():
                # Cast back to the format's schema: reading drops nothing, but the writer
                # compares schemas without metadata.
                w.write_table(t.filter(pa.array(part)).cast(F.arrow_schema(manifest)))
    except BaseException:
        w.abort()
        raise
    return w.close()


# -- merge -----------------------------------------------------------------------------------
def _check_empty(loc: Location) -> None:
    if loc.exists("") and (loc.exists(F.MANIFEST) or loc.list("")):
        raise MergeError(f"{loc.uri}: the output exists and is not empty; merge writes a new store — choose an empty path")


def _sample_ids(store: Store, i: int) -> pa.ChunkedArray:
    try:
        return store.open_shard(i).read(columns=["sample_id"]).column("sample_id")
    except (OSError, pa.ArrowInvalid) as exc:
        raise CorruptShardError(f"{store.uri}/{store.shards[i].file}: cannot read sample ids ({exc}); "
                                f"run 'kd store verify {store.uri}'") from exc


def merge_stores(out: str, sources: Sequence[str], *, shards: str = "copy", progress: bool = False) -> MergeReport:
    """Merge ``sources`` (store URIs, in priority order) into a new store at ``out``.

    Raises:
        MergeError: fewer than two sources, incompatible stores, an output that is not
            empty, or ``link`` across filesystems.
        CorruptShardError: a source shard whose bytes do not match its manifest.
    """
    if shards not in SHARD_MODES:
        raise MergeError(f"unknown shard mode {shards!r}; expected one of {SHARD_MODES}")
    if len(sources) < 2:
        raise MergeError("merge needs at least two source stores")
    stores = [open_store(s) for s in sources]
    check_compatible(stores)
    dst = resolve(out)
    _check_empty(dst)
    dst.makedirs(F.SHARD_DIR)
    report = MergeReport(out=out, sources=[s.uri for s in stores], shard_mode=shards)
    manifest = F.Manifest.from_json(stores[0].manifest.to_json(), source=f"{stores[0].uri}/{F.MANIFEST}")

    # Pass 1: which rows are first occurrences (cheap: one string column per shard).
    plan = [(si, i) for si, s in enumerate(stores) for i in range(len(s.shards))]
    bar = _bar(progress, total=2 * len(plan))
    keys, bounds = [], [0]
    for si, i in plan:
        k = _id_keys(_sample_ids(stores[si], i))
        keys.append(k)
        bounds.append(bounds[-1] + len(k))
        bar.update(1)
    keep_all = first_occurrence(np.concatenate(keys) if keys else np.zeros((0, 2), np.uint64))

    # Pass 2: take, or rewrite, each shard.
    out_shards: list[F.ShardInfo] = []
    for n, (si, i) in enumerate(plan):
        src, shard = stores[si], stores[si].shards[i]
        keep = keep_all[bounds[n]:bounds[n + 1]]
        if len(keep) != shard.rows:
            raise CorruptShardError(f"{src.uri}/{shard.file}: {len(keep)} rows but the manifest says {shard.rows}; "
                                    f"run 'kd store verify {src.uri}'")
        stem = posixpath.splitext(posixpath.basename(shard.file))[0]
        if keep.all():
            rel = f"{F.SHARD_DIR}/s{si:03d}-{stem}.parquet"
            (_copy_verified if shards == "copy" else _link_verified)(src, shard, dst, rel)
            out_shards.append(F.ShardInfo(file=rel, rows=shard.rows, tokens=shard.tokens, entries=shard.entries,
                                          bytes=shard.bytes, checksum=shard.checksum))
            report.shards_taken += 1
            report.bytes_written += shard.bytes if shards == "copy" else 0
        elif keep.any():
            out_shards.append(_rewrite(src, i, keep, dst, f"{F.SHARD_DIR}/s{si:03d}-{stem}-dedup.parquet", manifest))
            report.shards_rewritten += 1
            report.bytes_written += out_shards[-1].bytes
        bar.update(1)
    bar.close()

    vocab = _copy_vocab(stores[0], dst)
    if manifest.index_order is not None:  # identical in every source (identity); written before the manifest
        dst.write_bytes_atomic(F.INDEX_ORDER, stores[0].location.read_bytes(F.check_relative_path(manifest.index_order["file"])))
        manifest.index_order = {**manifest.index_order, "file": F.INDEX_ORDER}
    error_files, dead = _copy_dead_letters(stores, dst)
    report.rows_in = int(len(keep_all))
    report.rows_out = sum(s.rows for s in out_shards)
    report.duplicates = report.rows_in - report.rows_out
    report.dead_letters = dead
    report.per_source = [{"rows": s.num_rows, "dead_letters": int(s.manifest.errors.get("count", 0))} for s in stores]
    manifest.created_by = f"kdstore {__version__}"
    manifest.pipeline = {
        "tool": "kd store merge", "shards": shards,
        "sources": [{"uri": s.uri, "rows": s.num_rows, "shards": len(s.shards), "created_at": s.manifest.created_at,
                     "pipeline": s.manifest.pipeline} for s in stores],
    }
    finalize(dst, manifest, shards=out_shards, vocab=vocab, error_files=error_files, dead_letters=dead,
             extra_totals={"duplicates_dropped": report.duplicates})
    return report


def _copy_vocab(src: Store, dst: Location) -> dict[str, Any] | None:
    if not src.manifest.vocab:
        return None
    rel = src.manifest.vocab["file"]
    dst.write_bytes_atomic(F.VOCAB, src.location.read_bytes(F.check_relative_path(rel)))
    return {**src.manifest.vocab, "file": F.VOCAB}


def _copy_dead_letters(stores: Sequence[Store], dst: Location) -> tuple[list[str], int]:
    files, count = [], 0
    for si, s in enumerate(stores):
        for rel in s.manifest.errors.get("files", []):
            new = f"{F.ERROR_DIR}/s{si:03d}-{posixpath.basename(rel)}"
            dst.makedirs(F.ERROR_DIR)
            dst.write_bytes_atomic(new, s.location.read_bytes(F.check_relative_path(rel)))
            files.append(new)
        count += int(s.manifest.errors.get("count", 0))
    return files, count


def _bar(progress: bool, *, total: int):
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc="merge", unit="shard", disable=not progress, file=sys.stderr)


def merge_main(argv: list[str], prog: str = "kd store merge") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Merge stores written by separate capture jobs into one new "
                                 "store (same teacher, tokenizer, selection and quantization). Duplicates by sample_id "
                                 "are dropped (the first store named wins) and counted.")
    ap.add_argument("out", help="new store path or URI (must not exist, or be empty)")
    ap.add_argument("stores", nargs="+", help="source stores, in priority order")
    ap.add_argument("--shards", choices=SHARD_MODES, default="copy",
                    help="copy shard bytes (checked against their checksums), or hard-link them (local disk, one "
                         "filesystem: no new bytes). Shards holding a duplicate are always rewritten. (default: copy)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        r = merge_stores(args.out, args.stores, shards=args.shards, progress=not args.no_progress)
    except (StoreError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(f"{r.out}: {r.rows_out} rows from {len(r.sources)} stores ({r.rows_in} in, {r.duplicates} duplicate "
          f"sample ids dropped); {r.shards_taken} shards {'copied' if r.shard_mode == 'copy' else 'linked'}, "
          f"{r.shards_rewritten} rewritten without duplicates; {r.dead_letters} dead letters carried over")
    return 0
