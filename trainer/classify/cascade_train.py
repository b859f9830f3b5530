"""Pieces of the cascade's stages (seed 002): encoded text sets, prediction, evaluation,
throughput and the score histogram. Training runs in the shared classifier loop
(:func:`trainer.classify.loop.train_classifier`). Model-agnostic: any module
``(input_ids [B, T], attention_mask [B, T]) -> logits [B, C]`` from :mod:`trainer.classify.classifiers`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainer.classify.classifiers import classification_metrics, pad_batch
from trainer.classify.segment import SegmentationSampler, Vocab


@dataclass
class Encoded:
    """A text set as token ids: ids (N lists, each <= max_len, non-empty), labels ``[N]`` long,
    sample_ids (N content hashes)."""

    ids: list[list[int]]
    labels: torch.Tensor
    sample_ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: Sequence[int]) -> "Encoded":
        return Encoded(ids=[self.ids[i] for i in rows], labels=self.labels[list(rows)], sample_ids=[self.sample_ids[i] for i in rows])


def encode_texts(texts: Sequence[str], labels: Sequence[int], sample_ids: Sequence[str], *, vocab: Vocab,
                 segmentation: str, max_len: int) -> Encoded:
    """Segment (deterministic granularity: char / word / jieba) and map to ids, truncated to
    ``max_len``; the same path :class:`trainer.classify.classifiers.TextClassifier` uses at inference."""
    sampler = SegmentationSampler(granularities=(segmentation,))
    rng = random.Random(0)  # deterministic granularities ignore it
    ids = []
    for text, sid in zip(texts, sample_ids):
        row = vocab.encode(sampler.segment(text, segmentation, rng=rng), max_len=max_len)
        if not row:
            raise ValueError(f"sample {sid}: text encodes to no tokens (empty text?); remove it from the data")
        ids.append(row)
    return Encoded(ids=ids, labels=torch.as_tensor(list(labels), dtype=torch.long), sample_ids=list(sample_ids))


def _eval_batches(enc: Encoded, batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(enc)), key=lambda i: len(enc.ids[i]))
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]


@torch.inference_mode()
def predict_logits(model: nn.Module, enc: Encoded, *, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """Logits ``[N, C]`` float32 on CPU, in the order of ``enc``."""
    was_training = model.training
    model.eval()
    out: list[tuple[list[int], torch.Tensor]] = []
    for idx in _eval_batches(enc, batch_size):
        ids, mask = pad_batch([enc.ids[i] for i in idx], pad_id=0)
        out.append((idx, model(ids.to(device), mask.to(device)).float().cpu()))
    model.train(was_training)
    n_cls = out[0][1].shape[1] if out else 0
    logits = torch.empty(len(enc), n_cls)
    for idx, lg in out:
        logits[torch.tensor(idx, dtype=torch.long)] = lg
    return logits


def logit_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``loss`` (mean CE, nats), ``acc`` and ``macro_f1`` of logits ``[N, C]`` vs labels ``[N]``
    (accuracy and macro-F1 from :func:`trainer.classify.classifiers.classification_metrics`)."""
    if len(labels) == 0:
        return {"loss": float("nan"), "acc": float("nan"), "macro_f1": float("nan")}
    m = classification_metrics(logits.argmax(-1), labels, logits.shape[1])
    return {"loss": float(F.cross_entropy(logits.float(), labels)), "acc": m["acc"], "macro_f1": m["f1"]}


def evaluate(model: nn.Module, enc: Encoded, *, batch_size: int = 256, device: str = "cpu") -> dict[str, float]:
    return logit_metrics(predict_logits(model, enc, batch_size=batch_size, device=device), enc.labels)


def throughput(model: nn.Module, enc: Encoded, *, batch_size: int = 256, device: str = "cpu", repeats: int = 1) -> float:
    """Inference samples per second over ``enc`` (length-sorted batches; best of ``repeats``)."""
    best = 0.0
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        predict_logits(model, enc, batch_size=batch_size, device=device)
        best = max(best, len(enc) / max(time.perf_counter() - t0, 1e-9))
    return best


def plot_scores(scores, threshold: float, path: str | Path, *, title: str) -> None:
    """Histogram of A's per-sample scores with the split threshold."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(scores, bins=50, color="tab:blue")
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_yscale("log")
    ax.set_xlabel("score of A's soft label against the gold label")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
