"""``kd store inspect | verify | stats``: look at, check and plot a store.

Each ``*_main(argv, prog) -> int`` is a CLI entry point (see ``kdstore/cli.py``); the work is
done by :func:`summarize`, :func:`verify_store` and :func:`position_stats`, usable from
Python too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdstore import format as F
from kdstore import native
from kdstore.errors import StoreError
from kdstore.hashing import file_checksum
from kdstore.quant import LogQuantizer, SqrtQuantizer, quantizer
from kdstore.store import Store, _list_parts, open as open_store


# -- inspect -------------------------------------------------------------------------------------
def summarize(store: Store) -> dict[str, Any]:
    """Manifest summary plus sizes: bytes/token, bytes per kept entry, per-column bytes, k stats."""
    m = store.manifest
    tot = m.totals
    tokens, entries, nbytes = tot.get("tokens", 0), tot.get("entries", 0), tot.get("bytes", 0)
    col_bytes: dict[str, int] = {}
    counts_parts = []
    for i, shard in enumerate(store.shards):
        pf = store.open_shard(i)
        md = pf.metadata
        for rg in range(md.num_row_groups):
            g = md.row_group(rg)
            for c in range(g.num_columns):
                cc = g.column(c)
                name = cc.path_in_schema.split(".")[0]
                col_bytes[name] = col_bytes.get(name, 0) + cc.total_compressed_size
        if m.selection.variable:
            counts_parts.append(pf.read(columns=["counts"]).column("counts").combine_chunks().values.to_numpy(zero_copy_only=False))
    if m.selection.variable:
        k = np.concatenate(counts_parts).astype(np.int64) if counts_parts else np.zeros(0, np.int64)
    else:
        k = np.full(tokens, min(m.selection.k, m.teacher.vocab_size), dtype=np.int64)
    kstats = _describe(k) if len(k) else {}
    return {
        "uri": store.uri,
        "format_version": m.format_version,
        "created_by": m.created_by,
        "created_at": m.created_at,
        "level": m.level,
        "teacher": asdict(m.teacher),
        "selection": asdict(m.selection),
        "quantization": asdict(m.quantization),
        "index": {"dtype": m.index_dtype, "coding": m.index_coding, "order": (m.index_order or {}).get("source")},
        "columns": m.columns,
        "shards": len(store.shards),
        "totals": dict(tot),
        "dead_letters": m.errors.get("count", 0),
        "bytes_per_token": nbytes / tokens if tokens else None,
        "bytes_per_entry": nbytes / entries if entries else None,
        "column_bytes_per_token": {c: b / tokens for c, b in sorted(col_bytes.items())} if tokens else {},
        "k": kstats,
        "decoder": native.describe(),
    }


def _describe(x: np.ndarray) -> dict[str, float]:
    q = np.quantile(x, [0.1, 0.5, 0.9]) if len(x) else [math.nan] * 3
    return {"mean": float(np.mean(x)), "min": float(np.min(x)), "p10": float(q[0]), "p50": float(q[1]),
            "p90": float(q[2]), "max": float(np.max(x))}


def inspect_main(argv: list[str], prog: str = "kd store inspect") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Manifest summary, bytes/token, bytes per kept entry, k statistics.")
    ap.add_argument("uri", help="store directory or URI (file://, gs://, s3://, ...)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    try:
        s = summarize(open_store(args.uri))
    except StoreError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(s, indent=2, ensure_ascii=False))
        return 0
    t, sel, q = s["teacher"], s["selection"], s["quantization"]
    tot = s["totals"]
    params = {k: v for k, v in sel.items() if v is not None and k != "mode"}
    lines = [
        f"store        {s['uri']}",
        f"format       kdstore v{s['format_version']} ({s['created_by']}, {s['created_at']}), level={s['level']}",
        f"teacher      {t['name_or_path']}  vocab={t['vocab_size']} (padded)  weights={t['weights_hash']}  tokenizer={t['tokenizer_hash']}",
        f"selection    {sel['mode']} {params}",
        f"quantization probs={q['probs']} tail={q['tail'] or q['probs']} bits={q['bits']}; indices {s['index']['dtype']} {s['index']['coding']}"
        + (f" (order from {s['index']['order']})" if s["index"]["order"] else ""),
        f"columns      {', '.join(k for k, v in s['columns'].items() if v) or '(none optional)'}",
        f"shards       {s['shards']}   rows {tot.get('rows', 0):,}   positions {tot.get('tokens', 0):,}   "
        f"kept entries {tot.get('entries', 0):,}   bytes {tot.get('bytes', 0):,}   dead letters {s['dead_letters']}",
    ]
    if s["bytes_per_token"] is not None:
        lines.append(f"size         {s['bytes_per_token']:.2f} B/position, {s['bytes_per_entry']:.3f} B per kept entry")
        lines.append("  by column  " + ", ".join(f"{c} {b:.2f}" for c, b in s["column_bytes_per_token"].items()) + "  (B/position)")
    lines.append(f"decoder      {s['decoder']}")
    if s["k"]:
        k = s["k"]
        lines.append(f"k/position   mean {k['mean']:.2f}  min {k['min']:.0f}  p10 {k['p10']:.0f}  p50 {k['p50']:.0f}  p90 {k['p90']:.0f}  max {k['max']:.0f}")
    print("\n".join(lines))
    return 0


# -- verify --------------------------------------------------------------------------------------
def _mass_tolerance(q, n: np.ndarray) -> np.ndarray:
    """Largest |sum(p̂) - 1| the code allows for ``n`` coded values that sum to 1 (per position)."""
    if isinstance(q, SqrtQuantizer):
        # |p̂ - p| <= sqrt(p)/M + 1/(4M^2) and sum sqrt(p_i) <= sqrt(n) (Cauchy-Schwarz).
        return np.sqrt(n) / q.max_code + n / (4.0 * q.max_code**2)
    assert isinstance(q, LogQuantizer)
    return math.expm1(q.max_log_error) + n * math.exp(-q.log_range)


def _float_problems(batch: pa.RecordBatch, file: str) -> list[str]:
    """NaN or negative values in probability columns stored as floats (not by the encoder)."""
    out: list[str] = []
    for name in ("probs", "tail"):
        if name in batch.schema.names and pa.types.is_floating(batch.schema.field(name).type.value_type):
            _, v = _list_parts(batch, name)
            v = v.astype(np.float64)
            if np.isnan(v).any():
                out.append(f"{file}: column {name!r} holds {int(np.isnan(v).sum())} NaN value(s)")
            if (v < 0).any():
                out.append(f"{file}: column {name!r} holds {int((v < 0).sum())} negative value(s) (min {v[v < 0].min():.3g})")
    return out


def _mass_problems(store: Store, batch: pa.RecordBatch, file: str) -> list[str]:
    """Coded probabilities that cannot be a distribution: kept + tail not 1 within the
    code's bound (e.g. kept mass > 1, a negative implied tail), draw counts not summing to
    ``samples``."""
    m = store.manifest
    out: list[str] = []
    pos_off, tail_codes = _list_parts(batch, "tail")
    _, pcodes = _list_parts(batch, "probs")
    n_pos = len(tail_codes)
    if m.selection.variable:
        counts = _list_parts(batch, "counts")[1].astype(np.int64)
    else:
        counts = np.full(n_pos, min(m.selection.k, m.teacher.vocab_size), dtype=np.int64)
    if counts.sum() != len(pcodes) or (counts < 1).any():
        return [f"{file}: per-position counts do not match the stored entries (or a position keeps no entry)"]
    pos = np.repeat(np.arange(n_pos), counts)
    q = m.quantization
    tail_q = quantizer(q.tail_scheme, q.bits)
    tail = tail_q.decode(tail_codes).astype(np.float64)
    if q.probs == "count":
        draws = np.bincount(pos, weights=pcodes.astype(np.float64), minlength=n_pos)
        bad = draws != m.selection.samples
        if bad.any():
            p = int(np.flatnonzero(bad)[0])
            out.append(f"{file}: {int(bad.sum())} position(s) whose draw counts do not sum to samples={m.selection.samples} "
                       f"(first: position {p} has {int(draws[p])}); frequencies would not be probabilities")
        if (pcodes == 0).any():
            out.append(f"{file}: {int((pcodes == 0).sum())} kept entries with 0 draws")
        return out
    kept = np.bincount(pos, weights=store._probs_q.decode(pcodes).astype(np.float64), minlength=n_pos)
    total = kept + tail
    tol = np.maximum(_mass_tolerance(store._probs_q, counts + 1.0), _mass_tolerance(tail_q, counts + 1.0)) + 1e-4
    over = kept - 1.0 > tol
    if over.any():
        out.append(f"{file}: {int(over.sum())} position(s) where the kept probabilities sum to more than 1 "
                   f"(max {kept.max():.4f}, implied tail {1 - kept.max():.4f} is negative beyond the code's bound)")
    off = np.abs(total - 1.0) > tol
    if off.any():
        p = int(np.flatnonzero(off)[0])
        out.append(f"{file}: {int(off.sum())} position(s) whose kept + tail mass is not 1 within the {q.probs}{q.bits} "
                   f"bound (first: position {p}, sum {total[p]:.4f}, bound ±{tol[p]:.4f})")
    return out


def _check_shards(store: Store, *, workers: int, progress: bool) -> list[str]:
    """Problems of every shard, checked by ``workers`` threads (pyarrow and xxhash release
    the GIL, so shards verify in parallel); listed in shard order whatever finishes first."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from tqdm import tqdm  # noqa: PLC0415

    n = len(store.shards)
    workers = workers or min(8, os.cpu_count() or 1)
    with tqdm(total=n, desc="verify", unit="shard", file=sys.stderr, disable=not progress) as bar:
        if workers <= 1 or n <= 1:
            found = []
            for i in range(n):
                found.append(verify_shard(store, i))
                bar.update(1)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                found = []
                for res in pool.map(lambda i: verify_shard(store, i), range(n)):
                    found.append(res)
                    bar.update(1)
    return [p for ps in found for p in ps]


def verify_store(store_or_uri: Store | str, *, progress: bool = False, workers: int = 0) -> list[str]:
    """Every problem found in a store, each naming the file; empty when the store is sound.

    Checks: the manifest (version, fields, relative paths), totals, the vocabulary file
    (checksum, schema, unique hashes), the index order of a ``rank_delta`` store (checksum,
    a permutation of the teacher ids), each shard (exists, byte size, xxh3-128 checksum,
    Arrow schema and coding metadata, page CRCs, row/position/entry counts against the
    manifest, structure, index range, token hashes in the vocabulary, probability values),
    and the dead-letter files (exist, record count).
    """
    problems: list[str] = []
    try:
        store = open_store(store_or_uri) if not isinstance(store_or_uri, Store) else store_or_uri
    except (StoreError, OSError) as exc:
        return [str(exc)]
    m, loc = store.manifest, store.location
    root = store.uri.rstrip("/")
    for key, attr in (("rows", "rows"), ("tokens", "tokens"), ("entries", "entries"), ("bytes", "bytes")):
        want = sum(getattr(s, attr) for s in m.shards)
        if m.totals.get(key) != want:
            problems.append(f"{root}/{F.MANIFEST}: totals.{key}={m.totals.get(key)} but the shards sum to {want}")
    if m.vocab:
        problems += _check_vocab(store)
    elif m.level == "token":
        problems.append(f"{root}/{F.MANIFEST}: token-level store without a vocabulary table (token hashes cannot be mapped to ids)")
    if m.index_order is not None:
        try:
            store.index_order  # checksum and permutation, checked when read
        except (StoreError, OSError) as exc:
            return problems + [str(exc)]  # every shard's indices decode through it: checking them says no more
    problems += _check_shards(store, workers=workers, progress=progress)
    problems += _check_dead_letters(store)
    listed = {s.file for s in m.shards}
    for rel in loc.list(F.SHARD_DIR):
        if rel not in listed and rel.endswith(".parquet"):
            # Not corruption (a crashed bundle's leftover); the reader never opens it.
            print(f"warning: {root}/{rel} is not listed in the manifest (leftover of an interrupted write?)", file=sys.stderr)
    return problems


def _check_vocab(store: Store) -> list[str]:
    m, loc = store.manifest, store.location
    rel = m.vocab["file"]
    path = f"{store.uri.rstrip('/')}/{rel}"
    try:
        F.check_relative_path(rel)
        data = loc.read_bytes(rel)
    except (StoreError, OSError) as exc:
        return [f"{path}: cannot read the vocabulary table ({exc})"]
    out = []
    if m.vocab.get("checksum") and file_checksum(data) != m.vocab["checksum"]:
        out.append(f"{path}: checksum mismatch (manifest {m.vocab['checksum']}, file {file_checksum(data)}); the file is corrupt, re-create the store")
        return out
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (OSError, pa.ArrowInvalid) as exc:
        return [f"{path}: not a readable Parquet file ({exc})"]
    if table.schema.remove_metadata() != F.VOCAB_SCHEMA.remove_metadata():
        return [f"{path}: schema {table.schema} does not match format v{F.FORMAT_VERSION}"]
    h = table.column("hash").to_numpy()
    if len(np.unique(h)) != len(h):
        out.append(f"{path}: duplicate token hashes; token ids cannot be recovered")
    ids = table.column("id").to_numpy()
    if len(ids) and int(ids.max()) >= m.teacher.vocab_size:
        out.append(f"{path}: token id {int(ids.max())} >= teacher vocab size {m.teacher.vocab_size}")
    return out


def verify_shard(store: Store, i: int) -> list[str]:
    """Problems of shard ``i``; never raises: any byte of a shard may be corrupt, and
    whatever the Parquet reader makes of it (a decode error of any type) is reported
    against the file."""
    shard = store.shards[i]
    path = f"{store.uri.rstrip('/')}/{shard.file}"
    out: list[str] = []
    try:
        _check_shard_into(store, i, out)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        out.append(f"{path}: cannot decode ({type(exc).__name__}: {str(exc)[:200]}); the file is corrupt")
    return out


def _check_shard_into(store: Store, i: int, out: list[str]) -> None:
    shard = store.shards[i]
    loc = store.location
    path = f"{store.uri.rstrip('/')}/{shard.file}"
    try:
        store.shard_path(shard)  # relative, and (local disk) not a link out of the store
    except StoreError as exc:
        out.append(str(exc))
        return
    if not loc.exists(shard.file):
        out.append(f"{path}: listed in the manifest but missing; restore it or re-run the capture with --resume")
        return
    size = loc.size(shard.file)
    if size != shard.bytes:
        out.append(f"{path}: {size} bytes but the manifest says {shard.bytes} (truncated or replaced); re-run the capture with --resume")
    with loc.fs.open_input_stream(loc.join(shard.file)) as f:
        checksum = file_checksum(f)
    if checksum != shard.checksum:
        out.append(f"{path}: checksum mismatch (manifest {shard.checksum}, file {checksum}); the file is corrupt (bit flip or partial write)")
    try:
        pf = pq.ParquetFile(loc.join(shard.file), filesystem=loc.fs, page_checksum_verification=True)
    except (OSError, pa.ArrowInvalid) as exc:
        out.append(f"{path}: not a readable Parquet file ({exc})")
        return
    try:
        store._check_schema(pf.schema_arrow, shard.file)
        schema_ok = True
    except StoreError as exc:
        out.append(f"{path}: schema mismatch: {exc}")
        schema_ok = False
    rows = tokens = entries = 0
    try:
        for b in pf.iter_batches(batch_size=4096):
            rows += b.num_rows
            floats = _float_problems(b, path)
            out += floats
            if not schema_ok or floats:
                continue
            out += _mass_problems(store, b, path)
            tokens += len(_list_parts(b, "tail")[1])
            entries += len(_list_parts(b, "indices")[1])
            try:
                store.decode(b, source=f"/{shard.file}")
            except StoreError as exc:
                out.append(f"{path}: {exc}")
                break
    except (OSError, pa.ArrowInvalid) as exc:
        out.append(f"{path}: cannot decode ({exc}); the file is corrupt")
        return
    if schema_ok:
        for name, got, want in (("rows", rows, shard.rows), ("positions", tokens, shard.tokens), ("entries", entries, shard.entries)):
            if got != want:
                out.append(f"{path}: {got} {name} but the manifest says {want}")


def _check_dead_letters(store: Store) -> list[str]:
    m, loc = store.manifest, store.location
    n = 0
    out = []
    for rel in m.errors.get("files", []):
        path = f"{store.uri.rstrip('/')}/{rel}"
        if not loc.exists(rel):
            out.append(f"{path}: dead-letter file listed in the manifest is missing")
            continue
        for j, line in enumerate(loc.read_bytes(rel).decode("utf-8", errors="replace").splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                out.append(f"{path}: line {j + 1} is not JSON")
                continue
            if not isinstance(rec, dict) or "reason" not in rec:
                out.append(f"{path}: line {j + 1} has no 'reason'")
            n += 1
    if not out and n != m.errors.get("count", 0):
        out.append(f"{store.uri.rstrip('/')}/{F.MANIFEST}: errors.count={m.errors.get('count')} but the dead-letter files hold {n} records")
    return out


def verify_main(argv: list[str], prog: str = "kd store verify") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Check checksums, schema, counts and values; exit 1 on any corruption.")
    ap.add_argument("uri", help="store directory or URI")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--workers", type=int, default=0, help="threads checking shards in parallel (default: min(8, cores))")
    args = ap.parse_args(argv)
    problems = verify_store(args.uri, progress=not args.quiet, workers=args.workers)
    if problems:
        for p in problems:
            print(f"CORRUPT: {p}", file=sys.stderr)
        print(f"{prog}: {len(problems)} problem(s) found in {args.uri}", file=sys.stderr)
        return 1
    m = open_store(args.uri).manifest
    print(f"OK: {args.uri}: {len(m.shards)} shard(s), {m.totals.get('rows', 0):,} rows, {m.totals.get('tokens', 0):,} positions, "
          f"{m.totals.get('entries', 0):,} kept entries; checksums, schema, counts and values verified")
    return 0


# -- stats ---------------------------------------------------------------------------------------
def position_stats(store: Store, *, max_positions: int | None = None) -> dict[str, np.ndarray]:
    """Per-position arrays (float64 ``[P]``): ``kept`` mass (1 - stored tail), ``tail``,
    ``entropy`` (nats, of the kept entries plus the tail as one bucket: a lower bound on
    the teacher's entropy), ``k`` (kept entries). Reads rows in store order, stopping after
    ``max_positions``.
    """
    m = store.manifest
    q = m.quantization
    tail_q = quantizer(q.tail_scheme, q.bits)
    parts: dict[str, list[np.ndarray]] = {"kept": [], "tail": [], "entropy": [], "k": []}
    seen = 0
    cols = ["sample_id", "window", "token_start", "context_len", "counts", "indices", "probs", "tail"]
    for b in store.iter_batches(columns=cols):
        d = store.decode(b, with_inputs=False)
        stored_tail = tail_q.decode(_list_parts(b, "tail")[1]).astype(np.float64)
        p = d.probs.astype(np.float64)
        pos = np.repeat(np.arange(len(d.counts)), d.counts)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = np.bincount(pos, weights=np.where(p > 0, -p * np.log(p), 0.0), minlength=len(d.counts))
            t = d.tail.astype(np.float64)
            h += np.where(t > 0, -t * np.log(t), 0.0)
        parts["kept"].append(np.clip(1.0 - stored_tail, 0.0, 1.0))
        parts["tail"].append(stored_tail)
        parts["entropy"].append(h)
        parts["k"].append(d.counts.astype(np.float64))
        seen += len(d.counts)
        if max_positions is not None and seen >= max_positions:
            break
    out = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}
    if max_positions is not None:
        out = {k: v[:max_positions] for k, v in out.items()}
    return out


def stats_main(argv: list[str], prog: str = "kd store stats") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Histograms of kept mass, tail mass, entropy and k per position.")
    ap.add_argument("uri", help="store directory or URI")
    ap.add_argument("--plot", metavar="PNG", help="write the histograms to this PNG file")
    ap.add_argument("--max-positions", type=int, default=None, help="read at most this many positions (default: all)")
    args = ap.parse_args(argv)
    try:
        store = open_store(args.uri)
        st = position_stats(store, max_positions=args.max_positions)
    except StoreError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    n = len(st["k"])
    print(f"{args.uri}: {n:,} positions ({store.manifest.selection.mode})")
    print(f"{'':10s} {'mean':>9s} {'p10':>9s} {'p50':>9s} {'p90':>9s}")
    for name, label in (("kept", "kept mass"), ("tail", "tail mass"), ("entropy", "entropy"), ("k", "k")):
        if n:
            d = _describe(st[name])
            print(f"{label:10s} {d['mean']:9.4f} {d['p10']:9.4f} {d['p50']:9.4f} {d['p90']:9.4f}")
    if args.plot:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
            _plot(st, args.plot, title=f"{store.uri} ({store.manifest.selection.mode}, {n:,} positions)")
        except OSError as exc:
            print(f"{prog}: error: cannot write the plot {args.plot!r} ({exc.strerror or exc}); choose another --plot path",
                  file=sys.stderr)
            return 1
        print(f"wrote {args.plot}")
    return 0


def _plot(st: dict[str, np.ndarray], path: str, *, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    specs = [
        ("kept", "kept mass per position", np.linspace(0, 1, 51)),
        ("tail", "tail mass per position", np.linspace(0, 1, 51)),
        ("entropy", "entropy of kept + tail (nats)", 50),
        ("k", "kept entries (k) per position", None),
    ]
    for ax, (key, label, bins) in zip(axes.ravel(), specs):
        x = st[key]
        if key == "k":
            hi = int(x.max()) if len(x) else 1
            bins = np.arange(0.5, hi + 1.5, max(1, math.ceil(hi / 60)))
        ax.hist(x, bins=bins, color="#3b6ea8")
        ax.set_xlabel(label)
        ax.set_ylabel("positions")
        if len(x):
            ax.axvline(float(np.median(x)), color="#c0392b", lw=1, label=f"median {np.median(x):.3g}")
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
