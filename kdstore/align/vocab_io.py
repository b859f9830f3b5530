"""Reading and writing vocabulary alignment files (JSON or Parquet) for
:class:`kdstore.align.vocab.VocabAlignment` (its ``save`` / ``load``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdstore.align.match import TeacherVocab
from kdstore.align.student import load_student
from kdstore.align.vocab import _CODE, FILE_FORMAT, FILE_VERSION

if TYPE_CHECKING:
    from kdstore.align.vocab import VocabAlignment


def save_alignment(self: "VocabAlignment", path: str | Path) -> Path:
    """Write the alignment: ``*.json`` as JSON, anything else as Parquet (one row per
    teacher id: rule, targets, weights, input_id; metadata in the schema)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        doc = {"meta": self._meta(), "rule": self.rules.tolist(), "ptr": self.ptr.tolist(), "col": self.col.tolist(),
               "weight": self.weight.tolist(), "input_map": self.input_map.tolist()}
        if self.spell_ptr is not None:
            doc.update(spell_ptr=self.spell_ptr.tolist(), spell_col=self.spell_col.tolist())
        path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
        return path
    offsets = pa.array(self.ptr.astype(np.int32))
    table = pa.table({
        "teacher_id": pa.array(np.arange(self.teacher_vocab_size), pa.uint32()),
        "rule": pa.array(self.rules.tolist(), pa.string()).dictionary_encode(),
        "targets": pa.ListArray.from_arrays(offsets, pa.array(self.col, pa.int64())),
        "weights": pa.ListArray.from_arrays(offsets, pa.array(self.weight, pa.float32())),
        "input_id": pa.array(self.input_map, pa.int64()),
    })
    if self.spell_ptr is not None:
        table = table.append_column("spelling", pa.ListArray.from_arrays(
            pa.array(self.spell_ptr.astype(np.int32)), pa.array(self.spell_col, pa.int64())))
    table = table.replace_schema_metadata({FILE_FORMAT.encode(): json.dumps(self._meta(), ensure_ascii=False).encode()})
    pq.write_table(table, path, compression="zstd")
    return path


def load_alignment(cls: type, path: str | Path, *, store: Any = None, student: Any = None, compact: bool = False) -> "VocabAlignment":
    """Read an alignment written by :meth:`save`. With ``store`` / ``student`` given,
    check it was built for that teacher vocabulary / student tokenizer. ``compact``: see
    :meth:`map_targets` (a reading option, not stored)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such alignment file; build one with VocabAlignment.build(...).save(path)")
    try:
        if path.suffix == ".json":
            doc = json.loads(path.read_text(encoding="utf-8"))
            meta = doc["meta"]
            rules, ptr, col = doc["rule"], np.asarray(doc["ptr"], np.int64), np.asarray(doc["col"], np.int64)
            weight, input_map = np.asarray(doc["weight"], np.float32), np.asarray(doc["input_map"], np.int64)
            sp_ptr = np.asarray(doc["spell_ptr"], np.int64) if "spell_ptr" in doc else None
            sp_col = np.asarray(doc["spell_col"], np.int64) if "spell_col" in doc else None
        else:
            table = pq.read_table(path)
            meta = json.loads((table.schema.metadata or {})[FILE_FORMAT.encode()])
            rules = table.column("rule").to_pylist()
            tg = table.column("targets").combine_chunks()
            ptr = tg.offsets.to_numpy().astype(np.int64)
            col = tg.values.to_numpy().astype(np.int64)
            weight = table.column("weights").combine_chunks().values.to_numpy().astype(np.float32)
            input_map = table.column("input_id").to_numpy().astype(np.int64)
            sp_ptr = sp_col = None
            if "spelling" in table.schema.names:
                sp = table.column("spelling").combine_chunks()
                sp_ptr = sp.offsets.to_numpy().astype(np.int64)
                sp_col = sp.values.to_numpy().astype(np.int64)
    except (KeyError, ValueError, TypeError, OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"{path}: not a kdstore alignment file ({exc}); re-create it with VocabAlignment.build(...).save()") from exc
    if meta.get("format") != FILE_FORMAT or meta.get("version") != FILE_VERSION:
        raise ValueError(f"{path}: alignment format {meta.get('format')!r} v{meta.get('version')!r} is not supported (expected {FILE_FORMAT} v{FILE_VERSION})")
    extra = {k: v for k, v in meta.items() if k not in ("format", "version", "policy", "vocab_size", "student_vocab_size", "new_tokens")}
    al = cls(policy=meta["policy"], vocab_size=int(meta["vocab_size"]), student_vocab_size=int(meta["student_vocab_size"]),
             rule_codes=np.array([_CODE[r] for r in rules], dtype=np.uint8), ptr=ptr, col=col, weight=weight,
             input_map=input_map, new_tokens=list(meta["new_tokens"]), meta=extra, compact=compact,
             spell_ptr=sp_ptr, spell_col=sp_col)
    if store is not None:
        want = TeacherVocab.from_store(store).fingerprint
        if al.meta.get("teacher", {}).get("fingerprint") != want:
            raise ValueError(f"{path}: alignment was built for another teacher vocabulary than {store.uri}'s; rebuild it for this store")
    if student is not None:
        fp = load_student(student).fingerprint
        if al.meta.get("student", {}).get("fingerprint") != fp:
            raise ValueError(
                f"{path}: alignment was built for another student tokenizer "
                f"({al.meta.get('student', {}).get('name') or '?'}, fingerprint {al.meta.get('student', {}).get('fingerprint')}) "
                f"than {getattr(student, 'name', None) or student} (fingerprint {fp}); rebuild it with "
                f"'kd store align-build URI --student-tokenizer DIR --out FILE'"
            )
    return al
