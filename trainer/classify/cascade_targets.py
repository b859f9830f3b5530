"""Cascade distillation (seed 002): scoring teacher A's cached soft labels, the
target/substandard split, per-sample teacher selection for the student, and the student loss.

Everything here is keyed by ``sample_id`` (the store's content hash), never by position: the
split names samples, B's store must hold exactly the substandard samples, and the student looks
its teacher distribution up by id, so reordering or re-sharding a store cannot misalign labels.

Teacher sources per sample (``source`` codes):

* ``SOURCE_GOLD`` (0): no soft label; the student learns from the gold label only.
* ``SOURCE_A`` (1): A's soft label ("target label": A scored at or above the threshold).
* ``SOURCE_B`` (2): B's soft label ("optimized label": A scored below the threshold and B,
  trained on those samples only, re-labelled them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from kdstore.dataset import IGNORE_INDEX, SoftLabelDataset
from kdstore.store import Store, open as open_store
from trainer.core.losses import sparse_kd_loss

SOURCE_GOLD, SOURCE_A, SOURCE_B = 0, 1, 2
SOURCE_NAMES = {SOURCE_GOLD: "gold", SOURCE_A: "a", SOURCE_B: "b"}
SCORES = ("gold_prob", "hit")
SPLIT_FORMAT = "kdstore.cascade.split.v1"


@dataclass
class StoreTargets:
    """Dense per-sample class distributions read from a sequence-level store.

    sample_ids: N ids in store order; probs ``[N, C]`` float32 (0 where not kept);
    kept ``[N, C]`` bool (the class is among the stored entries); tail ``[N]`` float32 (mass of
    the classes not kept); labels ``[N]`` int64 (-100 where the store has no label);
    temperature: the store's capture temperature (its probabilities are at that temperature).
    """

    sample_ids: list[str]
    probs: torch.Tensor
    kept: torch.Tensor
    tail: torch.Tensor
    labels: torch.Tensor
    temperature: float = 1.0  # the capture temperature the probabilities carry (manifest)

    def index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.sample_ids)}


def read_store_targets(store: Store | str, *, batch_size: int = 4096) -> StoreTargets:
    """All rows of a sequence-level store, densified to ``[N, C]`` (C = the teacher's classes).

    Reads through :class:`kdstore.SoftLabelDataset` (dequantized, renormalized with the tail),
    in store order. Raises if the store is token-level or holds a sample id twice.
    """
    store = open_store(store) if isinstance(store, str) else store
    if store.manifest.level != "sequence":
        raise ValueError(f"{store.uri}: a cascade needs a sequence-level store, this one is {store.manifest.level!r}")
    c = store.manifest.teacher.vocab_size
    ds = SoftLabelDataset(store, batch_size=batch_size, shuffle=False)
    ids: list[str] = []
    probs, kept, tails, labels = [], [], [], []
    for b in ds:
        n, k = b["kd_indices"].shape
        # Padding slots carry index 0 and prob 0; mark kept by slot < count instead of prob > 0
        # so a stored (quantized) zero still counts as kept.
        p = torch.zeros(n, c).scatter_add_(1, b["kd_indices"], b["kd_probs"])
        valid = (b["kd_probs"] > 0).float()
        valid[:, 0] = 1.0  # the most probable entry is always stored, even if it decoded to 0
        # scatter_add (not scatter_): padding slots also point at index 0 and must not erase it.
        m = torch.zeros(n, c).scatter_add_(1, b["kd_indices"], valid) > 0
        ids.extend(b["sample_id"])
        probs.append(p)
        kept.append(m)
        tails.append(b["kd_tail"].float())
        labels.append(b["labels"].long())
    if len(set(ids)) != len(ids):
        dup = next(s for s in ids if ids.count(s) > 1)
        raise ValueError(f"{store.uri}: sample id {dup} appears more than once; a cascade store holds one row per sample")
    cat = (lambda xs, shape: torch.cat(xs) if xs else torch.zeros(shape))
    return StoreTargets(
        sample_ids=ids, probs=cat(probs, (0, c)), kept=cat(kept, (0, c)).bool(), tail=cat(tails, (0,)),
        labels=cat(labels, (0,)).long(), temperature=float(store.manifest.selection.temperature),
    )


# -- scoring and split -------------------------------------------------------------------------


def score_targets(t: StoreTargets, *, metric: str = "gold_prob") -> tuple[np.ndarray, np.ndarray]:
    """Score each cached prediction against its gold label.

    ``gold_prob``: the teacher probability of the gold class (0 if not kept); ``hit``: 1.0 when
    the teacher's most probable class is the gold one, else 0.0 (for single-label
    classification this is the per-sample F1 of predicted vs gold label set).
    Returns (scores ``[N]`` float64, predicted class ``[N]`` int64).
    """
    if metric not in SCORES:
        raise ValueError(f"unknown score metric {metric!r}; choose from {SCORES}")
    labels = t.labels
    if bool((labels == IGNORE_INDEX).any()):
        i = int((labels == IGNORE_INDEX).nonzero()[0, 0])
        raise ValueError(f"sample {t.sample_ids[i]}: the store has no gold label; capture with labels to score a cascade")
    pred = t.probs.argmax(-1)
    if metric == "gold_prob":
        score = t.probs.gather(1, labels.unsqueeze(1)).squeeze(1).double()
    else:
        score = (pred == labels).double()
    return score.numpy(), pred.numpy().astype(np.int64)


@dataclass
class Split:
    """Target / substandard split of a training set (one row per sample)."""

    sample_ids: list[str]
    labels: np.ndarray  # [N] int64 gold labels
    preds: np.ndarray  # [N] int64 teacher A's argmax
    scores: np.ndarray  # [N] float64
    target: np.ndarray  # [N] bool: score >= threshold
    threshold: float
    metric: str

    @property
    def target_ids(self) -> list[str]:
        return [s for s, t in zip(self.sample_ids, self.target) if t]

    @property
    def substandard_ids(self) -> list[str]:
        return [s for s, t in zip(self.sample_ids, self.target) if not t]

    def counts(self) -> dict[str, float]:
        n = len(self.sample_ids)
        nt = int(self.target.sum())
        return {"samples": n, "target": nt, "substandard": n - nt, "substandard_share": (n - nt) / max(n, 1),
                "threshold": self.threshold, "metric": self.metric, "mean_score": float(self.scores.mean()) if n else 0.0,
                "teacher_accuracy": float((self.preds == self.labels).mean()) if n else 0.0}

    def write(self, path: str | Path) -> None:
        table = pa.table({
            "sample_id": pa.array(self.sample_ids, pa.string()),
            "label": pa.array(self.labels, pa.int64()),
            "pred": pa.array(self.preds, pa.int64()),
            "score": pa.array(self.scores, pa.float64()),
            "target": pa.array(self.target, pa.bool_()),
        }).replace_schema_metadata({
            b"format": SPLIT_FORMAT.encode(), b"threshold": repr(float(self.threshold)).encode(),
            b"metric": self.metric.encode(),
        })
        pq.write_table(table, str(path))

    @classmethod
    def read(cls, path: str | Path) -> "Split":
        table = pq.read_table(str(path))
        meta = table.schema.metadata or {}
        if meta.get(b"format") != SPLIT_FORMAT.encode():
            raise ValueError(f"{path}: not a cascade split file (format {meta.get(b'format')!r}, expected {SPLIT_FORMAT!r})")
        return cls(
            sample_ids=table.column("sample_id").to_pylist(),
            labels=table.column("label").to_numpy(), preds=table.column("pred").to_numpy(),
            scores=table.column("score").to_numpy(), target=table.column("target").to_numpy(zero_copy_only=False),
            threshold=float(meta[b"threshold"]), metric=meta[b"metric"].decode(),
        )


def split_by_threshold(t: StoreTargets, *, threshold: float, metric: str = "gold_prob") -> Split:
    """Score every row of A's store and split: ``score >= threshold`` -> target, else substandard."""
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    scores, preds = score_targets(t, metric=metric)
    return Split(
        sample_ids=list(t.sample_ids), labels=t.labels.numpy().astype(np.int64), preds=preds, scores=scores,
        target=scores >= threshold, threshold=float(threshold), metric=metric,
    )


# -- per-sample teacher selection ------------------------------------------------------------


@dataclass
class TeacherTable:
    """The student's teacher distribution per training sample, looked up by sample id.

    source ``[N]`` int64 (``SOURCE_*``); probs ``[N, C]``; kept ``[N, C]``; tail ``[N]``;
    temperature: the teacher stores' capture temperature, at which the student is tempered.
    Rows with ``SOURCE_GOLD`` are all zeros and never enter the KD term.
    """

    sample_ids: list[str]
    source: torch.Tensor
    probs: torch.Tensor
    kept: torch.Tensor
    tail: torch.Tensor
    temperature: float = 1.0

    def __post_init__(self) -> None:
        self._index = {s: i for i, s in enumerate(self.sample_ids)}

    def lookup(self, sample_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(source ``[B]``, probs ``[B, C]``, kept ``[B, C]``, tail ``[B]``) for a batch of ids."""
        try:
            rows = torch.tensor([self._index[s] for s in sample_ids], dtype=torch.long)
        except KeyError as exc:
            raise KeyError(f"sample {exc.args[0]} has no entry in the teacher table (not in the training set?)") from None
        return self.source[rows], self.probs[rows], self.kept[rows], self.tail[rows]

    def counts(self) -> dict[str, int]:
        return {SOURCE_NAMES[k]: int((self.source == k).sum()) for k in SOURCE_NAMES}

    def write(self, path: str | Path) -> None:
        """Inspectable copy: sample_id, source name, dense probs, tail."""
        pq.write_table(pa.table({
            "sample_id": pa.array(self.sample_ids, pa.string()),
            "source": pa.array([SOURCE_NAMES[int(s)] for s in self.source], pa.string()),
            "probs": pa.array(list(self.probs.numpy()), pa.list_(pa.float32())),
            "tail": pa.array(self.tail.numpy(), pa.float32()),
        }), str(path))


def build_teacher_table(
    *,
    sample_ids: Sequence[str],
    labels: Sequence[int],
    num_classes: int,
    teachers: str,
    split: Split | None = None,
    a: StoreTargets | None = None,
    b: StoreTargets | None = None,
) -> TeacherTable:
    """Choose the teacher of every training sample.

    ``teachers``: ``cascade`` (A for target samples, B for substandard ones), ``a`` (A for all)
    or ``gold`` (none). Every lookup is by sample id and checked: a sample without its teacher
    row, a store label that disagrees with the data, or a B store holding anything but the
    substandard samples raises an error naming the sample.
    """
    if teachers not in ("cascade", "a", "gold"):
        raise ValueError(f"teachers must be cascade, a or gold, got {teachers!r}")
    n = len(sample_ids)
    source = torch.zeros(n, dtype=torch.long)
    probs = torch.zeros(n, num_classes)
    kept = torch.zeros(n, num_classes, dtype=torch.bool)
    tail = torch.zeros(n)
    if teachers == "gold":
        return TeacherTable(sample_ids=list(sample_ids), source=source, probs=probs, kept=kept, tail=tail)
    if a is None:
        raise ValueError(f"teachers={teachers!r} needs A's store")
    if teachers == "cascade" and b is not None and abs(b.temperature - a.temperature) > 1e-9:
        raise ValueError(f"A's store was captured at temperature {a.temperature}, B's at {b.temperature}: one student "
                         "temperature cannot match both; re-capture them at one temperature")
    want = torch.full((n,), SOURCE_A, dtype=torch.long)
    if teachers == "cascade":
        if split is None or b is None:
            raise ValueError("teachers='cascade' needs the split and B's store")
        is_target = dict(zip(split.sample_ids, split.target.tolist()))
        missing = [s for s in sample_ids if s not in is_target]
        if missing:
            raise ValueError(f"sample {missing[0]} (and {len(missing) - 1} more) is not in the split; re-run stage a")
        want = torch.tensor([SOURCE_A if is_target[s] else SOURCE_B for s in sample_ids], dtype=torch.long)
        sub = {s for s, t in is_target.items() if not t}
        extra = set(b.sample_ids) - sub
        if extra:
            raise ValueError(f"B's store holds sample {sorted(extra)[0]} which is not substandard; B must see substandard samples only")
    for code, t, name in ((SOURCE_A, a, "A"), (SOURCE_B, b, "B")):
        rows = (want == code).nonzero().flatten()
        if len(rows) == 0:
            continue
        if t is None or t.probs.shape[1] != num_classes:
            raise ValueError(f"teacher {name} store has {None if t is None else t.probs.shape[1]} classes, the data has {num_classes}")
        idx = t.index()
        try:
            src = torch.tensor([idx[sample_ids[i]] for i in rows.tolist()], dtype=torch.long)
        except KeyError as exc:
            raise ValueError(f"sample {exc.args[0]} has no row in teacher {name}'s store; re-run its capture") from None
        gold = torch.as_tensor([int(labels[i]) for i in rows.tolist()], dtype=torch.long)
        stored = t.labels[src]
        bad = (stored != IGNORE_INDEX) & (stored != gold)
        if bool(bad.any()):
            j = int(bad.nonzero()[0, 0])
            raise ValueError(f"sample {sample_ids[int(rows[j])]}: teacher {name}'s store says label {int(stored[j])}, "
                             f"the data says {int(gold[j])}; the store was made from other data")
        source[rows] = code
        probs[rows] = t.probs[src]
        kept[rows] = t.kept[src]
        tail[rows] = t.tail[src]
    return TeacherTable(sample_ids=list(sample_ids), source=source, probs=probs, kept=kept, tail=tail,
                        temperature=a.temperature)


# -- student loss -------------------------------------------------------------------------------


def sparse_kl(student_logits: torch.Tensor, probs: torch.Tensor, kept: torch.Tensor, tail: torch.Tensor, *,
              temperature: float = 1.0) -> torch.Tensor:
    """Per-sample forward KL(q || p_T) over the kept classes plus one tail bucket, ``[B]``:
    :func:`trainer.core.losses.sparse_kd_loss` (the one sparse KL) on dense per-class tensors,
    without its ``T**2`` factor.

    student_logits ``[B, C]``; probs ``[B, C]`` stored teacher probabilities (0 where not kept);
    kept ``[B, C]`` bool; tail ``[B]`` teacher mass outside the kept classes. The stored
    probabilities are used as they are (they carry the capture temperature); the student is
    ``softmax(z / T)``.
    """
    idx, p = _as_sparse(probs, kept)
    mask = torch.ones(student_logits.shape[0], dtype=torch.bool, device=student_logits.device)
    kd = sparse_kd_loss(student_logits, idx, p, tail, mask, temperature=temperature, reduction="none")
    return kd / temperature**2


def _as_sparse(probs: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[B, C]`` teacher rows -> the store's sparse layout: indices ``[B, C]`` (every
    class) and probabilities ``[B, C]`` with 0 on the classes that are not kept (the core loss
    treats probability-0 slots as padding, so they join the tail bucket)."""
    b, c = probs.shape
    idx = torch.arange(c, device=probs.device).expand(b, c)
    return idx, torch.where(kept, probs.float(), 0.0)


@dataclass
class LossWeights:
    """Weights of the student loss: gold CE, KD on A's target labels, KD on B's optimized
    labels, and the KD temperature: the stores' capture temperature (the student is tempered
    by it, the stored targets are not; KD terms are scaled by T^2)."""

    gold: float = 1.0
    target: float = 1.0
    optimized: float = 1.0
    temperature: float = 2.0


def cascade_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    source: torch.Tensor,
    probs: torch.Tensor,
    kept: torch.Tensor,
    tail: torch.Tensor,
    *,
    weights: LossWeights,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Student loss of one batch, averaged over its samples::

        loss = mean_i [ w_gold * CE(z_i, y_i) + w_src(i) * T^2 * KL(q_i || p_i,T) ]

    with ``w_src`` = ``weights.target`` for samples whose teacher is A, ``weights.optimized``
    for B, and 0 for gold-only samples; ``q_i`` is the stored distribution as it is (captured at
    temperature T), ``p_i,T = softmax(z_i / T)``. The KD term is
    :func:`trainer.core.losses.sparse_kd_loss`. logits ``[B, C]``; labels ``[B]`` (-100 = no
    gold label: no CE term); source/probs/kept/tail from :meth:`TeacherTable.lookup`.
    Returns (scalar loss, parts: mean CE and mean KL (without T^2) over the samples that have them).
    """
    n = logits.shape[0]
    if n == 0:
        raise ValueError("empty batch")
    logits = logits.float()
    has_gold = labels != IGNORE_INDEX
    ce = F.cross_entropy(logits, labels.clamp_min(0), reduction="none") * has_gold
    w_kd = torch.where(source == SOURCE_A, weights.target, torch.where(source == SOURCE_B, weights.optimized, 0.0))
    has_kd = source != SOURCE_GOLD
    t = weights.temperature
    kd = torch.zeros(n, device=logits.device)  # T^2 * KL per sample, 0 for gold-only samples
    if bool(has_kd.any()):
        idx, p = _as_sparse(probs, kept)
        kd = sparse_kd_loss(logits, idx, p, tail, has_kd, temperature=t, reduction="none")
    loss = (weights.gold * ce + w_kd.to(logits) * kd).sum() / n
    parts = {
        "ce": float(ce.detach().sum() / has_gold.sum().clamp_min(1)),
        "kl": float(kd.detach().sum() / t**2 / has_kd.sum().clamp_min(1)),
    }
    return loss, parts
