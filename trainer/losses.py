"""Distillation losses as small functions over the dataset's batch tensors.

Shapes (token level; any leading shape works, ``[B, T]`` below):

* student ``logits`` ``[B, T, V]`` (any float dtype; every loss is computed in fp32)
* ``labels`` ``[B, T]`` long: the next token, ``-100`` ignored (already shifted: position t
  is compared with ``logits[:, t]``)
* ``kd_indices`` ``[B, T, K]`` long, ``kd_probs`` ``[B, T, K]`` float (0 in padding slots),
  ``kd_tail`` ``[B, T]`` float (teacher mass outside the kept entries), ``kd_mask`` ``[B, T]``
* ``teacher_logits`` ``[B, T, V']`` for the dense (online teacher) baseline

Conventions (all losses): fp32 math; positions outside the mask contribute nothing; the
``"mean"`` reduction divides by the number of valid positions and returns an exact 0 (with
a gradient path, never NaN) when there are none; ``chunk_size`` processes positions in
chunks under activation checkpointing, so the fp32 ``[N, V]`` intermediates of only one
chunk are alive at a time, forward and backward (results equal the unchunked ones).

The sparse KL treats the kept entries plus one *tail bucket* as a (K+1)-class
distribution: the teacher's tail mass against the student's mass on every class that is
not kept. With all classes kept (K = V) it is the dense KL. A slot is a kept entry when
its probability is > 0 (padding slots hold probability 0). In ``sample`` mode the stored
draw frequencies (tail 0) are the target: forward KL is then the RS-KD estimator, an
unbiased estimate of the full cross-entropy up to a constant.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
KINDS = ("forward", "reverse", "symmetric")
# Fill value for kept classes when summing the student's tail mass: finite (a -inf row
# would give NaN gradients when every class is kept) and far below any real logit after
# the row maximum is subtracted, so exp() underflows to exactly 0.
_MASKED = -1.0e4


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown KD loss kind {kind!r}; expected one of {KINDS}")


def _reduce_positions(
    fn: Callable[..., torch.Tensor],
    logits: torch.Tensor,
    mask: torch.Tensor,
    extras: tuple[torch.Tensor, ...],
    *,
    chunk_size: int,
    reduction: str,
) -> torch.Tensor:
    """Apply ``fn(rows_logits [n, V], *rows_extras) -> per-position loss [n]`` to the masked
    positions of ``logits [..., V]`` (extras shaped ``[..., *]`` like the mask), in chunks."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits {tuple(logits.shape)} without the vocab axis")
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    n_all = flat.shape[0]
    flat_extras = tuple(e.reshape(n_all, *e.shape[mask.dim():]) for e in extras)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    n = rows.numel()
    # Zero that keeps the graph connected: backward gives zero gradients, not an error.
    total = flat.sum().float() * 0.0
    if n:
        step = n if chunk_size <= 0 else chunk_size

        def part(x_all: torch.Tensor, r: torch.Tensor, *ex: torch.Tensor) -> torch.Tensor:
            return fn(x_all.index_select(0, r), *(e.index_select(0, r) for e in ex)).sum()

        use_ckpt = chunk_size > 0 and n > chunk_size and torch.is_grad_enabled() and flat.requires_grad
        for s in range(0, n, step):
            r = rows[s : s + step]
            if use_ckpt:
                total = total + checkpoint(part, flat, r, *flat_extras, use_reentrant=False)
            else:
                total = total + part(flat, r, *flat_extras)
    return total / max(n, 1) if reduction == "mean" else total


# -- cross-entropy -------------------------------------------------------------------------
def ce_loss(logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 0, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (nats) of ``logits [..., V]`` against ``labels [...]``
    (``-100`` ignored), fp32, averaged over labelled positions (0 when there are none)."""
    mask = labels != IGNORE_INDEX

    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(x.float(), y, reduction="none")

    return _reduce_positions(fn, logits, mask, (labels,), chunk_size=chunk_size, reduction=reduction)


# -- sparse KD (stored targets) ------------------------------------------------------------
def _sparse_rows(
    x: torch.Tensor, idx: torch.Tensor, p: torch.Tensor, tail: torch.Tensor,
    *, kind: str, temperature: float, tail_bucket: bool, eps: float,
) -> torch.Tensor:
    """Per-position sparse KL: x ``[n, V]`` student logits, idx/p ``[n, K]``, tail ``[n]``."""
    z = x.float() / temperature
    z = z - z.max(-1, keepdim=True).values.detach()  # stable; does not change the softmax
    log_z = torch.logsumexp(z, -1)  # [n]
    p = p.float()
    valid = p > 0
    logq = torch.gather(z, 1, idx) - log_z[:, None]  # [n, K] student log-probs of kept classes
    if tail_bucket:
        # Student mass on every class that is not kept (kept_count handles duplicate
        # padding indices: scatter_add is deterministic where a boolean scatter is not).
        kept = torch.zeros_like(z).scatter_add_(1, idx, valid.to(z.dtype)) > 0
        logq_tail = torch.logsumexp(z.masked_fill(kept, _MASKED), -1) - log_z  # [n]
        # A position that keeps every class has no tail class: its stored tail is
        # quantization noise, not mass the student could put anywhere.
        p_tail = torch.where(kept.all(-1), torch.zeros_like(tail), tail.float().clamp_min(0.0))
        fwd = (torch.xlogy(p, p) - p * logq).masked_fill(~valid, 0.0).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * logq_tail
        if kind == "forward":
            return fwd
        logp = torch.log(p.clamp_min(eps))
        logp_tail = torch.log(p_tail.clamp_min(eps))
        q, q_tail = logq.exp(), logq_tail.exp()
        rev = (q * (logq - logp)).masked_fill(~valid, 0.0).sum(-1) + q_tail * (logq_tail - logp_tail)
    else:
        # No tail bucket: the kept entries renormalised are the target (the common, biased
        # "top-k only" loss); the reverse direction renormalises the student over them too.
        p_n = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        fwd = (torch.xlogy(p_n, p_n) - p_n * logq).masked_fill(~valid, 0.0).sum(-1)
        if kind == "forward":
            return fwd
        logq_k = logq.masked_fill(~valid, -math.inf)
        logq_n = (logq_k - torch.logsumexp(logq_k, -1, keepdim=True)).masked_fill(~valid, 0.0)
        logp_n = torch.log(p_n.clamp_min(eps))
        rev = (logq_n.exp() * (logq_n - logp_n)).masked_fill(~valid, 0.0).sum(-1)
    return rev if kind == "reverse" else 0.5 * (fwd + rev)


def sparse_kd_loss(
    logits: torch.Tensor,
    kd_indices: torch.Tensor,
    kd_probs: torch.Tensor,
    kd_tail: torch.Tensor,
    kd_mask: torch.Tensor,
    *,
    kind: str = "forward",
    temperature: float = 1.0,
    tail_bucket: bool = True,
    chunk_size: int = 0,
    eps: float = 1e-8,
    reduction: str = "mean",
) -> torch.Tensor:
    """KL between stored sparse teacher targets and the student, in nats, times ``T**2``.

    ``forward`` = KL(teacher || student), ``reverse`` = KL(student || teacher),
    ``symmetric`` = their mean. The student's logits are divided by ``temperature``; the
    stored targets are already at the capture temperature. Reverse KL floors the teacher's
    log-probabilities at ``log(eps)`` (a kept class or tail of probability 0 would make it
    infinite). Indices must be < V (the student's vocabulary, aligned if needed).
    """
    _check_kind(kind)
    if kd_indices.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"kd_indices {tuple(kd_indices.shape)} do not match logits {tuple(logits.shape)}")
    if kd_indices.numel() and int(kd_indices.max()) >= logits.shape[-1]:
        raise ValueError(
            f"teacher index {int(kd_indices.max())} >= student vocabulary {logits.shape[-1]}: resize the student's "
            "embeddings to the store's (or alignment's) vocab_size"
        )

    def fn(x, idx, p, tail):
        return _sparse_rows(x, idx, p, tail, kind=kind, temperature=temperature, tail_bucket=tail_bucket, eps=eps)

    loss = _reduce_positions(fn, logits, kd_mask.bool(), (kd_indices, kd_probs, kd_tail), chunk_size=chunk_size, reduction=reduction)
    return loss * temperature**2


# -- dense KD (online teacher) -------------------------------------------------------------
def _dense_rows(x: torch.Tensor, t: torch.Tensor, *, kind: str, temperature: float, eps: float) -> torch.Tensor:
    logq = F.log_softmax(x.float() / temperature, -1)
    t = t.float() / temperature
    if t.shape[-1] < logq.shape[-1]:
        # The student's extra (padding) classes have teacher probability 0.
        t = F.pad(t, (0, logq.shape[-1] - t.shape[-1]), value=-math.inf)
    logp = F.log_softmax(t, -1)
    p = logp.exp()
    fwd = (p * (logp.clamp_min(-1e30) - logq)).sum(-1)  # 0 * finite where p == 0
    if kind == "forward":
        return fwd
    q = logq.exp()
    rev = (q * (logq - logp.clamp_min(math.log(eps)))).sum(-1)
    return rev if kind == "reverse" else 0.5 * (fwd + rev)


def dense_kd_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "forward",
    temperature: float = 1.0,
    chunk_size: int = 0,
    eps: float = 1e-8,
    reduction: str = "mean",
) -> torch.Tensor:
    """Full-vocabulary KL (nats, times ``T**2``) between teacher logits ``[..., V']`` and
    student logits ``[..., V]`` (V' <= V: the student's extra classes get teacher mass 0),
    both divided by ``temperature``; ``mask [...]`` selects positions."""
    _check_kind(kind)
    if teacher_logits.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match student logits {tuple(logits.shape)}")
    if teacher_logits.shape[-1] > logits.shape[-1]:
        raise ValueError(
            f"teacher vocabulary {teacher_logits.shape[-1]} > student vocabulary {logits.shape[-1]}: build the student "
            "with the teacher's (padded) vocab_size"
        )

    def fn(x, t):
        return _dense_rows(x, t.detach(), kind=kind, temperature=temperature, eps=eps)

    loss = _reduce_positions(fn, logits, mask.bool(), (teacher_logits,), chunk_size=chunk_size, reduction=reduction)
    return loss * temperature**2


def mix(ce: torch.Tensor, kd: torch.Tensor, kd_weight: float) -> torch.Tensor:
    """``(1 - a) * CE + a * KD``; a term with weight 0 is skipped (so a NaN there cannot leak)."""
    if kd_weight <= 0.0:
        return ce
    if kd_weight >= 1.0:
        return kd
    return (1.0 - kd_weight) * ce + kd_weight * kd
