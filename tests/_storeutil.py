"""Helpers shared by the store tests: tiny vocabularies, rows from real selections, planting
hand-made shards (bypassing the encoder) for corruption tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdstore import Selection, SoftLabelRow, StoreWriter, TeacherInfo, vocab_table
from kdstore.hashing import file_checksum
from pipelines.selection import select

MODES = {
    "topk": dict(k=8),
    "top_p": dict(p=0.9, max_k=24),
    "sample": dict(samples=16),
}


def vocab(v: int):
    toks = [f"tok{i}" for i in range(v)]
    return vocab_table(ids=list(range(v)), tokens=toks, token_bytes=[t.encode() for t in toks], special=[i < 2 for i in range(v)])


@dataclass
class Exact:
    """What was written for one row (before quantization)."""

    ids: np.ndarray
    indices: np.ndarray
    probs: np.ndarray
    counts: np.ndarray
    tail: np.ndarray


def make_rows(n_rows: int, v: int, mode: str, *, seed: int = 0, max_len: int = 12, scale: float = 3.0,
              text: bool = False, label: bool = False, sel: dict | None = None):
    """Rows whose targets come from :func:`pipelines.selection.select` on random logits
    (``sel``: the selection's parameters, default ``MODES[mode]``)."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    hashes = vocab(v).column("hash").to_numpy()
    rows, exact = [], []
    for r in range(n_rows):
        t = int(rng.integers(1, max_len + 1))
        ids = rng.integers(0, v, t)
        logits = torch.randn(t, v, generator=g) * scale
        i, p, c, tail = select(logits, mode=mode, generator=g, **(sel or MODES[mode])).flat()
        txt = " ".join(f"w{x}" for x in ids) if text else None
        offs = np.cumsum([0] + [len(f"w{x}") + 1 for x in ids]) if text else None
        rows.append(SoftLabelRow(
            sample_id=f"{r:016x}", tokens=hashes[ids], counts=c, indices=i, probs=p, tail=tail, window=r % 3,
            token_start=7 * r, context_len=min(r % 2, t), text=txt,
            byte_start=offs[:-1] if text else None, byte_end=(offs[1:] - 1) if text else None,
            label=(r % 2 if r % 5 else None) if label else None,
        ))
        exact.append(Exact(ids, i, p, c, tail))
    return rows, exact


def write_store(path, rows, *, v: int, mode: str, bits: int = 8, scheme: str = "sqrt", sel: dict | None = None, **kw) -> Path:
    cols = kw.pop("columns", None)
    with StoreWriter(str(path), teacher=TeacherInfo(name_or_path="unit-teacher", vocab_size=v), selection=Selection(mode=mode, **(sel or MODES[mode])),
                     bits=bits, scheme=scheme, columns=cols, **kw) as w:
        w.write_vocab(vocab(v))
        w.write(rows)
    return Path(path)


def plant_shard(store_dir: Path, table: pa.Table, *, shard: int = 0, **write_kw) -> Path:
    """Replace shard ``shard`` with ``table`` (any schema) and update the manifest's entry
    (bytes, checksum, rows, positions, entries) so that only the planted problem remains."""
    store_dir = Path(store_dir)
    man = json.loads((store_dir / "manifest.json").read_text())
    info = man["shards"][shard]
    path = store_dir / info["file"]
    pq.write_table(table, path, **write_kw)
    data = path.read_bytes()
    info.update(bytes=len(data), checksum=file_checksum(data), rows=table.num_rows)
    if "tail" in table.column_names:
        info["tokens"] = sum(len(x) for x in table.column("tail").to_pylist())
    if "indices" in table.column_names:
        info["entries"] = sum(len(x) for x in table.column("indices").to_pylist())
    for key in ("rows", "tokens", "entries", "bytes"):
        man["totals"][key] = sum(s[key] for s in man["shards"])
    (store_dir / "manifest.json").write_text(json.dumps(man))
    return path


def edit_manifest(store_dir: Path, fn) -> None:
    p = Path(store_dir) / "manifest.json"
    man = json.loads(p.read_text())
    fn(man)
    p.write_text(json.dumps(man))


def entry_sets(exact: list[Exact]):
    """Per position: {index: prob} dicts of the exact rows, in order."""
    out = []
    for e in exact:
        off = np.concatenate([[0], np.cumsum(e.counts)])
        for q in range(len(e.counts)):
            sl = slice(off[q], off[q + 1])
            out.append(dict(zip(e.indices[sl].tolist(), e.probs[sl].tolist())))
    return out
