"""``kd store export``: decoded soft labels in plain, readable files.

Two formats, for inspection and for tools that cannot (or should not) decode the store's
codes:

* ``jsonl``: one JSON object per store row (window), with every position's input token and
  its kept entries, most probable first: ``{"sample_id", "window", "token_start",
  "context_len", ["label",] "positions": [{"id", "token", "tail", "top": [{"id", "token",
  "p"}, ...]}, ...]}``.
* ``parquet-dense-topk``: one Parquet row per *position* with plain columns: ``sample_id``
  (string), ``window``, ``position`` (uint32), ``input_id`` (int64, -1 at sequence level),
  ``input_token`` (string), ``topk_ids`` (list<int64>), ``topk_tokens`` (list<string>),
  ``topk_probs`` (list<float32>, descending), ``tail`` (float32). No dictionary or
  BYTE_STREAM_SPLIT encodings: any Parquet reader opens it.

Probabilities are the reader's (dequantized, renormalised with the tail; ``sample`` mode:
draw frequencies, tail 0). ``--top N`` keeps the N most probable entries per position;
``--limit`` bounds the rows exported (the end-of-run line says how many of how many).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from kdstore.errors import StoreError
from kdstore.store import DecodedRows, Store, open as open_store

FORMATS = ("jsonl", "parquet-dense-topk")
DENSE_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("window", pa.uint32()), ("position", pa.uint32()), ("input_id", pa.int64()),
    ("input_token", pa.string()), ("topk_ids", pa.list_(pa.int64())), ("topk_tokens", pa.list_(pa.string())),
    ("topk_probs", pa.list_(pa.float32())), ("tail", pa.float32()),
])


def _token_strings(store: Store) -> np.ndarray:
    """``[vocab_size]`` object array: id -> vocabulary string (None for ids not in the table)."""
    out = np.full(store.manifest.teacher.vocab_size, None, dtype=object)
    if store.manifest.vocab and store.manifest.level == "token":
        v = store.vocab
        out[v.column("id").to_numpy().astype(np.int64)] = v.column("token").to_pylist()
    return out


def _positions(d: DecodedRows, r: int, top: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, float]]:
    """``(t, input_id, ids [k], probs [k] descending, tail)`` for each position of row ``r``."""
    a, b = int(d.positions[r]), int(d.positions[r + 1])
    for t, q in enumerate(range(a, b)):
        e0, e1 = int(d.entry_offsets[q]), int(d.entry_offsets[q + 1])
        p = d.probs[e0:e1]
        order = np.argsort(-p, kind="stable")[: top or None]
        input_id = int(d.input_ids[q]) if len(d.input_ids) else -1
        yield t, input_id, d.indices[e0:e1][order], p[order], float(d.tail[q])


def export_store(store: Store, output: str | Path, *, fmt: str, limit: int = 0, top: int = 0, progress: bool = True) -> dict[str, Any]:
    """Write ``limit`` rows (0 = all) of ``store`` to ``output`` in ``fmt``; returns
    ``{"rows", "positions", "rows_in_store", "output"}``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}")
    if limit < 0 or top < 0:
        raise ValueError("--limit and --top must be >= 0 (0 = no limit)")
    strings = _token_strings(store)
    total = store.num_rows if not limit else min(limit, store.num_rows)
    done = positions = 0
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")  # the final name appears only for a complete export
    bar = tqdm(total=total, desc="export", unit="row", disable=not progress)
    writer = None
    try:
        with open(tmp, "w", encoding="utf-8") if fmt == "jsonl" else contextlib.nullcontext() as fh:
            if fmt != "jsonl":
                writer = pq.ParquetWriter(str(tmp), DENSE_SCHEMA, compression="zstd", use_dictionary=False)
            for d in store.iter_decoded(batch_rows=256):
                n = min(d.num_rows, total - done)
                cols: dict[str, list] = {f.name: [] for f in DENSE_SCHEMA}
                for r in range(n):
                    pos = list(_positions(d, r, top))
                    positions += len(pos)
                    if fmt == "jsonl":
                        fh.write(json.dumps(_json_row(d, r, pos, strings), ensure_ascii=False) + "\n")
                    else:
                        for t, i, ids, p, tail in pos:
                            for k, v in (("sample_id", d.sample_id[r]), ("window", int(d.window[r])), ("position", t),
                                         ("input_id", i), ("input_token", strings[i] if i >= 0 else None),
                                         ("topk_ids", ids.tolist()), ("topk_tokens", strings[ids].tolist()),
                                         ("topk_probs", p.tolist()), ("tail", tail)):
                                cols[k].append(v)
                if writer is not None and n:
                    writer.write_table(pa.table(cols, schema=DENSE_SCHEMA))
                done += n
                bar.update(n)
                if done >= total:
                    break
        if writer is not None:
            writer.close()
            writer = None
        tmp.replace(out)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return {"rows": done, "positions": positions, "rows_in_store": store.num_rows, "output": str(out)}


def _json_row(d: DecodedRows, r: int, pos: list, strings: np.ndarray) -> dict[str, Any]:
    rec: dict[str, Any] = {"sample_id": d.sample_id[r], "window": int(d.window[r]), "token_start": int(d.token_start[r]),
                           "context_len": int(d.context_len[r])}
    if d.label is not None:
        rec["label"] = None if int(d.label[r]) == -100 else int(d.label[r])
    rec["positions"] = [
        {"id": i if i >= 0 else None, "token": strings[i] if i >= 0 else None, "tail": tail,
         "top": [{"id": int(j), "token": strings[j], "p": float(q)} for j, q in zip(ids, p)]}
        for _, i, ids, p, tail in pos
    ]
    return rec


def main(argv: list[str] | None = None, prog: str = "kd store export") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Write decoded soft labels (token strings, probabilities) as JSONL "
                                 "or as a plain-column Parquet file, one row per position.")
    ap.add_argument("uri", help="store directory or URI")
    ap.add_argument("-o", "--output", required=True, help="output file (.jsonl or .parquet)")
    ap.add_argument("--format", dest="fmt", required=True, choices=FORMATS)
    ap.add_argument("--limit", type=int, default=1000, help="store rows (windows) to export; 0 = all (default 1000)")
    ap.add_argument("--top", type=int, default=0, help="keep the N most probable entries per position; 0 = all kept")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if Path(args.output).exists() and not args.overwrite:
        print(f"{prog}: error: {args.output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if args.limit < 0 or args.top < 0:
        print(f"{prog}: error: --limit and --top must be >= 0 (0 = no limit)", file=sys.stderr)
        return 2
    try:
        res = export_store(open_store(args.uri), args.output, fmt=args.fmt, limit=args.limit, top=args.top,
                           progress=not args.no_progress)
    except StoreError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    cut = " (--limit; 0 exports all)" if res["rows"] < res["rows_in_store"] else ""
    print(f"exported {res['rows']:,} of {res['rows_in_store']:,} rows ({res['positions']:,} positions) to {res['output']}{cut}")
    return 0
