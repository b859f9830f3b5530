"""Write soft-label stores from an in-process teacher, without Beam (tests, benchmarks).

The production path is ``kd cache`` (:mod:`pipelines.capture`); this is the same capture
in a plain loop for a model already in memory: tokenize (tokenizer template, no EOS, as
the pipeline does), cut samples into non-overlapping windows of ``max_length`` tokens,
run the teacher once per batch and apply *several* selections to the same logits, so
stores for top-k, top-p and sampling come from one teacher pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from kdstore.format import Selection, TeacherInfo
from kdstore.hashing import sample_id as content_id
from pipelines.selection import sample_uniforms, select
from kdstore.writer import SoftLabelRow, StoreWriter


@dataclass
class _Window:
    sample_id: str
    window: int
    token_start: int
    ids: np.ndarray


def teacher_vocabulary(tokenizer: Any):
    """The store's vocabulary table for ``tokenizer`` (the pipeline's builder when present)."""
    try:
        from pipelines.teacher import vocabulary  # noqa: PLC0415

        return vocabulary(tokenizer)
    except ImportError:  # pragma: no cover - the pipeline ships with kdstore
        from kdstore.writer import vocab_table  # noqa: PLC0415

        ids = list(range(len(tokenizer)))
        tokens = tokenizer.convert_ids_to_tokens(ids)
        special = set(tokenizer.all_special_ids)
        return vocab_table(ids=ids, tokens=tokens, token_bytes=[t.encode("utf-8") for t in tokens], special=[i in special for i in ids])


def _windows(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[_Window]:
    enc = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    out = []
    seen: set[str] = set()
    for text, ids in zip(texts, enc):
        sid = content_id(text)
        if sid in seen or not ids:
            continue  # exact duplicate (same content id) or nothing to predict
        seen.add(sid)
        ids = np.asarray(ids, dtype=np.int64)
        for w, s in enumerate(range(0, len(ids), max_length)):
            out.append(_Window(sid, w, s, ids[s : s + max_length]))
    return out


@torch.no_grad()
def cache_with_model(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    stores: Mapping[str, Selection],
    *,
    max_length: int = 128,
    batch_size: int = 32,
    bits: int = 8,
    name_or_path: str | None = None,
    overwrite: bool = False,
    shard_bytes: int = 8 << 20,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, Any]]:
    """Capture ``texts`` with ``model`` into one store per ``{uri: Selection}``.

    Returns ``{uri: {"rows", "tokens", "seconds"}}``; ``seconds`` is the shared teacher
    forward time plus that store's own selection/encoding time.
    """
    import time  # noqa: PLC0415

    device = torch.device(device)
    model = model.to(device).eval()
    vocab = int(model.get_input_embeddings().weight.shape[0])
    path = name_or_path or str(getattr(model, "name_or_path", "") or "in-memory")
    info = TeacherInfo(
        name_or_path=path, vocab_size=vocab, tokenizer_vocab_size=len(tokenizer),
        architecture=(getattr(model.config, "architectures", None) or [type(model).__name__])[0],
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
    vocab_tab = teacher_vocabulary(tokenizer)
    hash_of = np.zeros(len(tokenizer), dtype=np.uint64)
    hash_of[vocab_tab.column("id").to_numpy().astype(np.int64)] = vocab_tab.column("hash").to_numpy()
    windows = sorted(_windows(tokenizer, texts, max_length), key=lambda w: len(w.ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    writers = {
        uri: StoreWriter(uri, teacher=info, selection=sel, bits=bits, overwrite=overwrite, shard_bytes=shard_bytes,
                         pipeline={"tool": "trainer.lm.cache_local", "max_length": max_length})
        for uri, sel in stores.items()
    }
    times = {uri: 0.0 for uri in stores}
    t_forward = 0.0
    for w in writers.values():
        w.write_vocab(vocab_tab)
    try:
        for s in tqdm(range(0, len(windows), batch_size), disable=not progress, desc="capture", unit="batch"):
            group = windows[s : s + batch_size]
            T = max(len(w.ids) for w in group)
            ids = torch.full((len(group), T), pad, dtype=torch.long)
            att = torch.zeros((len(group), T), dtype=torch.long)
            for i, w in enumerate(group):
                ids[i, : len(w.ids)] = torch.from_numpy(w.ids)
                att[i, : len(w.ids)] = 1
            t0 = time.perf_counter()
            logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits.float()
            flat = logits[att.to(device).bool()]  # [N, V], rows in window order
            t_forward += time.perf_counter() - t0
            lengths = [len(w.ids) for w in group]
            for uri, sel in stores.items():
                t0 = time.perf_counter()
                uniforms = None
                if sel.mode == "sample":
                    keys = [int(w.sample_id, 16) ^ w.window for w in group]
                    uniforms = torch.from_numpy(sample_uniforms(keys, lengths, sel.samples, sel.seed or 0)).to(device)
                sp = select(flat, mode=sel.mode, k=sel.k, p=sel.p, max_k=sel.max_k, samples=sel.samples,
                            temperature=sel.temperature, uniforms=uniforms)
                idx, probs, counts, tail = sp.flat()
                writers[uri].write(_rows(group, lengths, idx, probs, counts, tail, hash_of))
                times[uri] += time.perf_counter() - t0
    except BaseException:
        for w in writers.values():
            w.abort()  # no manifest: readers reject the partial stores
        raise
    for w in writers.values():
        w.close()
    tokens = sum(len(w.ids) for w in windows)
    return {uri: {"rows": len(windows), "tokens": tokens, "seconds": t_forward + times[uri]} for uri in stores}


def _rows(group: list[_Window], lengths: list[int], idx, probs, counts, tail, hash_of) -> list[SoftLabelRow]:
    rows = []
    p0 = e0 = 0
    for w, n in zip(group, lengths):
        c = counts[p0 : p0 + n]
        e = int(c.sum())
        rows.append(SoftLabelRow(
            sample_id=w.sample_id, tokens=hash_of[w.ids], counts=c, indices=idx[e0 : e0 + e], probs=probs[e0 : e0 + e],
            tail=tail[p0 : p0 + n], window=w.window, token_start=w.token_start,
        ))
        p0 += n
        e0 += e
    return rows


def store_bytes_per_token(uri: str | Path) -> float:
    """Shard bytes per stored position (zstd Parquet, as written)."""
    import kdstore  # noqa: PLC0415

    m = kdstore.open(str(uri)).manifest
    return m.totals["bytes"] / max(1, m.totals["tokens"])
