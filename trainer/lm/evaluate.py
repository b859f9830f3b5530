"""Held-out evaluation: CE / perplexity against the true next token, KL to the teacher.

Batches come from a held-out store (KL to its sparse targets, with the tail bucket) or
from held-out text (full-vocabulary KL to a teacher model when one is given). Sums are
reduced over ranks, so every rank returns the metrics of the whole held-out set.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable

import torch

from trainer.core.losses import IGNORE_INDEX, ce_loss, dense_kd_loss, sparse_kd_loss


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` (``fp32`` = none)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Keyword arguments of a Hugging Face causal LM for a batch: ``attention_mask``, or for a
    packed batch ``position_ids`` that restart per row and no mask (transformers then masks
    attention per row; it does so only without a KV cache, hence ``use_cache=False``)."""
    ids = batch["input_ids"].to(device, non_blocking=True)
    if "position_ids" in batch:
        return {"input_ids": ids, "position_ids": batch["position_ids"].to(device, non_blocking=True), "use_cache": False}
    return {"input_ids": ids, "attention_mask": batch["attention_mask"].to(device, non_blocking=True).long()}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    device: torch.device,
    precision: str = "fp32",
    teacher: torch.nn.Module | None = None,
    max_batches: int = 0,
    loss_chunk: int = 0,
) -> dict[str, Any]:
    """Metrics over ``batches`` (all of them, or the first ``max_batches``).

    Returns ``ce`` (nats per target token), ``ppl`` (= exp(ce)), ``kl`` (nats per
    position, KL(teacher || model); NaN when there is no teacher signal), ``kl_kind``
    (``sparse``: stored targets with tail bucket, a lower bound of the full KL; ``full``:
    a teacher model's full distribution) and ``tokens`` (target tokens evaluated).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # ce_sum, ce_n, kl_sum, kl_n
    kind = "none"
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        inputs = model_inputs(batch, device)
        labels = batch["labels"].to(device)
        with autocast(device, precision):
            logits = model(**inputs).logits
        sums[0] += float(ce_loss(logits, labels, chunk_size=loss_chunk, reduction="sum"))
        sums[1] += float((labels != IGNORE_INDEX).sum())
        if "kd_indices" in batch:
            kind = "sparse"
            mask = batch["kd_mask"].to(device)
            sums[2] += float(sparse_kd_loss(
                logits, batch["kd_indices"].to(device), batch["kd_probs"].to(device), batch["kd_tail"].to(device),
                mask, chunk_size=loss_chunk, reduction="sum",
            ))
            sums[3] += float(mask.sum())
        elif teacher is not None:
            kind = "full"
            with autocast(device, precision):
                t_logits = teacher(**inputs).logits
            mask = labels != IGNORE_INDEX
            sums[2] += float(dense_kd_loss(logits, t_logits, mask, chunk_size=loss_chunk, reduction="sum"))
            sums[3] += float(mask.sum())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = sums.to(device)
        torch.distributed.all_reduce(t)
        sums = t.cpu()
    if was_training:
        model.train()
    ce = float(sums[0] / sums[1]) if sums[1] > 0 else math.nan
    return {
        "ce": ce,
        "ppl": math.exp(ce) if math.isfinite(ce) else math.nan,
        "kl": float(sums[2] / sums[3]) if sums[3] > 0 else math.nan,
        "kl_kind": kind,
        "tokens": int(sums[1]),
    }


@torch.no_grad()
def bits_per_char(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    *,
    seq_len: int = 128,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> float:
    """Held-out bits per character on the model's **own** tokenization of ``texts``.

    Each text is tokenized by ``tokenizer`` (no special tokens) and cut into windows of
    ``seq_len`` tokens; every token after a window's first is scored. The numerator is the
    summed negative log-likelihood in bits; the denominator is the number of characters
    those scored tokens cover (from each window's first-token end to its last-token end, by
    the tokenizer's character offsets), so models with different tokenizers are compared on
    (almost exactly) the same text: only each window's first token is not scored.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    windows: list[tuple[list[int], int]] = []
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    for ids, offs in zip(enc["input_ids"], enc["offset_mapping"]):
        for s in range(0, len(ids), seq_len):
            w, o = ids[s : s + seq_len], offs[s : s + seq_len]
            if len(w) >= 2:
                windows.append((w, int(o[-1][1]) - int(o[0][1])))
    windows.sort(key=lambda x: len(x[0]))
    nll, chars = 0.0, 0
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    for b in range(0, len(windows), batch_size):
        group = windows[b : b + batch_size]
        T = max(len(w) for w, _ in group)
        ids = torch.full((len(group), T), pad, dtype=torch.long)
        att = torch.zeros((len(group), T), dtype=torch.long)
        for i, (w, _) in enumerate(group):
            ids[i, : len(w)] = torch.tensor(w)
            att[i, : len(w)] = 1
        labels = torch.where(att[:, 1:].bool(), ids[:, 1:], IGNORE_INDEX)
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits[:, :-1]
        nll += float(ce_loss(logits, labels.to(device), reduction="sum"))
        chars += sum(c for _, c in group)
    if was_training:
        model.train()
    return nll / math.log(2) / max(1, chars)
