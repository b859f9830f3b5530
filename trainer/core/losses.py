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
its probability is > 0 (padding slots hold probability 0); kept indices are unique within
a position (the store guarantees it). In ``sample`` mode the stored
draw frequencies (tail 0) are the target: forward KL is then the RS-KD estimator, an
unbiased estimate of the full cross-entropy up to a constant.

:func:`sparse_jsd_loss` is TRL GKD's generalized Jensen-Shannon divergence (beta) over the
same (K+1)-class targets; :func:`ce_and_stored_kd_loss` picks the loss by name for recipes.

The trainer calls :func:`ce_and_sparse_kd_loss` / :func:`ce_and_dense_kd_loss`: the same
two numbers as the separate losses (tested values and gradients), but from one fp32
log-softmax over ``[N, V]`` -- for a small student that tensor is the largest of the step,
so sharing it is what keeps a cached-KD step close to a CE-only step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
# Student tail mass below which log(1 - kept mass) is recomputed exactly (fp32 cancellation).
_EXACT_TAIL = 1e-3


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown KD loss kind {kind!r}; expected one of {KINDS}")


def _compute_every_row(n: int, n_all: int) -> bool:
    """With ``n`` of ``n_all`` positions valid: compute every row and mask the results (True)
    or gather the valid rows first (False). When most rows are valid, the gather (a copy of
    ``[n, V]``) and the scatter of its gradient cost more than the wasted rows."""
    return 4 * n >= 3 * n_all


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
    flat_mask = mask.reshape(-1)
    rows = flat_mask.nonzero().squeeze(1)
    n = rows.numel()
    if n == 0:
        # Zero that keeps the graph connected: backward gives zero gradients, not an error.
        return flat.sum().float() * 0.0

    def part(x_all: torch.Tensor, r: torch.Tensor, *ex: torch.Tensor) -> torch.Tensor:
        return fn(x_all.index_select(0, r), *(e.index_select(0, r) for e in ex)).sum()

    if chunk_size <= 0 or n <= chunk_size:
        if _compute_every_row(n, n_all):
            total = torch.where(flat_mask, fn(flat, *flat_extras), 0.0).sum()
        else:
            total = part(flat, rows, *flat_extras)
    else:
        total = flat.sum().float() * 0.0
        use_ckpt = torch.is_grad_enabled() and flat.requires_grad
        for s in range(0, n, chunk_size):
            r = rows[s : s + chunk_size]
            if use_ckpt:
                total = total + checkpoint(part, flat, r, *flat_extras, use_reentrant=False)
            else:
                total = total + part(flat, r, *flat_extras)
    return total / n if reduction == "mean" else total


# -- cross-entropy -------------------------------------------------------------------------
def ce_loss(logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 0, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (nats) of ``logits [..., V]`` against ``labels [...]``
    (``-100`` ignored), fp32, averaged over labelled positions (0 when there are none)."""
    mask = labels != IGNORE_INDEX

    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(x.float(), y, reduction="none", ignore_index=IGNORE_INDEX)

    return _reduce_positions(fn, logits, mask, (labels,), chunk_size=chunk_size, reduction=reduction)


# -- sparse KD (stored targets) ------------------------------------------------------------
def _student_tail(z: torch.Tensor, logq: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor,
                  tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log q_tail [n], p_tail [n])``: the student's log-mass outside the kept classes and the
    teacher's tail (0 where every class is kept: a stored tail there is quantization noise).

    ``log(1 - sum q_kept)`` costs O(n K) but loses precision when the kept mass is near 1;
    those rows (tail < ``_EXACT_TAIL``) are recomputed exactly as a log-sum-exp over the
    classes that are not kept (O(V) per row, only for them).
    """
    q_kept = (logq.exp() * valid).sum(-1)  # kept ids are unique per position (the store's rule)
    # The clamp also zeroes the gradient of rows replaced below (no 0 * inf in backward).
    logq_tail = torch.log1p(-q_kept.clamp(max=1.0 - _EXACT_TAIL))
    p_tail = tail.float().clamp_min(0.0)
    exact = (q_kept > 1.0 - _EXACT_TAIL).nonzero().squeeze(1)
    if exact.numel():
        zr = z.index_select(0, exact)
        # scatter_add, not a boolean scatter: deterministic when padding repeats an index.
        kept = torch.zeros_like(zr).scatter_add_(1, idx.index_select(0, exact), valid.index_select(0, exact).to(zr.dtype)) > 0
        zr = zr - zr.max(-1, keepdim=True).values.detach()  # so the finite fill underflows to 0
        exact_tail = torch.logsumexp(zr.masked_fill(kept, _MASKED), -1) - torch.logsumexp(zr, -1)
        logq_tail = logq_tail.index_put((exact,), exact_tail)
        full = exact[kept.all(-1)]
        if full.numel():
            p_tail = p_tail.index_put((full,), torch.zeros_like(full, dtype=p_tail.dtype))
    return logq_tail, p_tail


def _sparse_rows(
    x: torch.Tensor, idx: torch.Tensor, p: torch.Tensor, tail: torch.Tensor,
    *, kind: str, temperature: float, tail_bucket: bool, eps: float,
) -> torch.Tensor:
    """Per-position sparse KL: x ``[n, V]`` student logits, idx/p ``[n, K]``, tail ``[n]``."""
    z = x.float()
    if temperature != 1.0:
        z = z / temperature
    logq = torch.gather(z, 1, idx) - torch.logsumexp(z, -1, keepdim=True)  # [n, K] student log-probs of kept classes
    return _sparse_terms(z, logq, idx, p, tail, kind=kind, tail_bucket=tail_bucket, eps=eps)


def _sparse_terms(
    z: torch.Tensor, logq: torch.Tensor, idx: torch.Tensor, p: torch.Tensor, tail: torch.Tensor,
    *, kind: str, tail_bucket: bool, eps: float,
) -> torch.Tensor:
    """Per-position sparse KL from the student's logits ``z [n, V]`` (at the KD temperature,
    any per-row shift: log-probabilities work too) and their log-probabilities at the kept
    indices ``logq [n, K]``."""
    p = p.float()
    valid = p > 0
    if tail_bucket:
        logq_tail, p_tail = _student_tail(z, logq, idx, valid, tail)
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


def _check_sparse_args(kind: str, logits: torch.Tensor, kd_indices: torch.Tensor) -> None:
    _check_kind(kind)
    if kd_indices.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"kd_indices {tuple(kd_indices.shape)} do not match logits {tuple(logits.shape)}")
    if kd_indices.numel() and int(kd_indices.max()) >= logits.shape[-1]:
        raise ValueError(
            f"teacher index {int(kd_indices.max())} >= student vocabulary {logits.shape[-1]}: resize the student's "
            "embeddings to the store's (or alignment's) vocab_size"
        )


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
    _check_sparse_args(kind, logits, kd_indices)

    def fn(x, idx, p, tail):
        return _sparse_rows(x, idx, p, tail, kind=kind, temperature=temperature, tail_bucket=tail_bucket, eps=eps)

    loss = _reduce_positions(fn, logits, kd_mask.bool(), (kd_indices, kd_probs, kd_tail), chunk_size=chunk_size, reduction=reduction)
    return loss * temperature**2


# -- dense KD (online teacher) -------------------------------------------------------------
def _dense_rows(x: torch.Tensor, t: torch.Tensor, *, kind: str, temperature: float, eps: float) -> torch.Tensor:
    z = x.float()
    logq = F.log_softmax(z / temperature if temperature != 1.0 else z, -1)
    return _dense_terms(logq, t, kind=kind, temperature=temperature, eps=eps)


def _dense_terms(logq: torch.Tensor, t: torch.Tensor, *, kind: str, temperature: float, eps: float) -> torch.Tensor:
    """Per-position dense KL from the student's log-probabilities ``logq [n, V]`` (at the KD
    temperature) and the teacher's logits ``t [n, V']``."""
    with torch.no_grad():  # the teacher side is a constant: no graph, fewer passes
        t = t.float() / temperature
        if t.shape[-1] < logq.shape[-1]:
            # The student's extra (padding) classes have teacher probability 0.
            t = F.pad(t, (0, logq.shape[-1] - t.shape[-1]), value=-math.inf)
        logp = F.log_softmax(t, -1)
        p = logp.exp()
        neg_entropy = (p * logp.clamp_min(-1e30)).sum(-1)  # 0 * finite where p == 0
    fwd = neg_entropy - (p * logq).sum(-1)
    if kind == "forward":
        return fwd
    q = logq.exp()
    rev = (q * (logq - logp.clamp_min(math.log(eps)))).sum(-1)
    return rev if kind == "reverse" else 0.5 * (fwd + rev)


def _check_dense_args(kind: str, logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    _check_kind(kind)
    if teacher_logits.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match student logits {tuple(logits.shape)}")
    if teacher_logits.shape[-1] > logits.shape[-1]:
        raise ValueError(
            f"teacher vocabulary {teacher_logits.shape[-1]} > student vocabulary {logits.shape[-1]}: build the student "
            "with the teacher's (padded) vocab_size"
        )


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
    _check_dense_args(kind, logits, teacher_logits)

    def fn(x, t):
        return _dense_rows(x, t.detach(), kind=kind, temperature=temperature, eps=eps)

    loss = _reduce_positions(fn, logits, mask.bool(), (teacher_logits,), chunk_size=chunk_size, reduction=reduction)
    return loss * temperature**2


# -- CE and KD from one log-softmax ----------------------------------------------------------
def ce_and_sparse_kd_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ce_loss(...), sparse_kd_loss(...))`` (both ``"mean"``), equal to the two separate
    calls; at ``temperature=1`` without chunking both come from one fp32 log-softmax of
    ``logits [..., V]``, which saves the second pass over ``[N, V]`` forward and backward
    (the largest tensor of a small model's step)."""
    if temperature != 1.0 or chunk_size > 0:  # the separate losses (they check their arguments)
        ce = ce_loss(logits, labels, chunk_size=chunk_size)
        return ce, sparse_kd_loss(logits, kd_indices, kd_probs, kd_tail, kd_mask, kind=kind, temperature=temperature,
                                  tail_bucket=tail_bucket, chunk_size=chunk_size, eps=eps)
    _check_sparse_args(kind, logits, kd_indices)
    K = kd_indices.shape[-1]

    def kd_rows(lsm: torch.Tensor, lsm_kept: torch.Tensor, kept: torch.Tensor, m: torch.Tensor, take: _Take) -> torch.Tensor:
        # Masked positions get an all-padding target (p = 0, tail = 0): finite, then dropped.
        p = torch.where(m[:, None], take(kd_probs.reshape(-1, K)).float(), 0.0)
        tail = torch.where(m, take(kd_tail.reshape(-1)).float(), 0.0)
        return _sparse_terms(lsm, lsm_kept, kept, p, tail, kind=kind, tail_bucket=tail_bucket, eps=eps)

    return _ce_with_kd(logits, labels, kd_mask, kd_rows, kd_indices.reshape(-1, K))


def ce_and_dense_kd_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "forward",
    temperature: float = 1.0,
    chunk_size: int = 0,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ce_loss(...), dense_kd_loss(...))`` from one log-softmax when ``temperature=1`` and
    unchunked (the online-teacher baseline gets the same saving as the cached path)."""
    if temperature != 1.0 or chunk_size > 0:  # the separate losses (they check their arguments)
        ce = ce_loss(logits, labels, chunk_size=chunk_size)
        return ce, dense_kd_loss(logits, teacher_logits, mask, kind=kind, temperature=temperature, chunk_size=chunk_size, eps=eps)
    _check_dense_args(kind, logits, teacher_logits)
    t_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()

    def kd_rows(lsm: torch.Tensor, lsm_kept: torch.Tensor, kept: torch.Tensor | None, m: torch.Tensor,
                take: _Take) -> torch.Tensor:
        return _dense_terms(lsm, take(t_flat), kind=kind, temperature=1.0, eps=eps)

    return _ce_with_kd(logits, labels, mask, kd_rows, None)


_Take = Callable[[torch.Tensor], torch.Tensor]


def _ce_with_kd(
    logits: torch.Tensor, labels: torch.Tensor, kd_mask: torch.Tensor,
    kd_rows: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, _Take], torch.Tensor],
    kd_indices: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE over labelled positions and mean KD over ``kd_mask``, sharing one
    ``lsm = log_softmax(logits)`` over the positions either loss needs.

    ``kd_rows(lsm [n, V], lsm at the kept indices [n, K], kept indices [n, K] or None,
    kd mask [n], take) -> [n]`` gets the computed rows only; ``take(t)`` selects those rows
    of a flattened ``[N, ...]`` tensor.
    """
    if kd_mask.shape != logits.shape[:-1] or labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} / mask {tuple(kd_mask.shape)} do not match logits {tuple(logits.shape)}")
    flat = logits.reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    ce_m, kd_m = y != IGNORE_INDEX, kd_mask.reshape(-1).bool()
    used = ce_m | kd_m
    if _compute_every_row(int(used.sum()), used.numel()):
        def take(t: torch.Tensor) -> torch.Tensor:
            return t
    else:
        # Padding-heavy batches (short documents): only the rows either loss needs.
        rows = used.nonzero().squeeze(1)

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, rows)

        flat, y, ce_m, kd_m = take(flat), take(y), take(ce_m), take(kd_m)
    lsm = F.log_softmax(flat.float(), -1)
    # One gather for the label and the kept entries: its backward is one scatter into [n, V].
    yc = y.clamp_min(0)[:, None]
    kept = None if kd_indices is None else take(kd_indices)
    picked = torch.gather(lsm, 1, yc if kept is None else torch.cat([yc, kept], 1))
    ce = torch.where(ce_m, -picked[:, 0], 0.0).sum() / ce_m.sum().clamp_min(1)
    kd = torch.where(kd_m, kd_rows(lsm, picked[:, 1:], kept, kd_m, take), 0.0).sum() / kd_m.sum().clamp_min(1)
    return ce, kd


# -- R-Drop (sequence classification; ``kd train rdrop``) ----------------------------------
@dataclass
class RDropLoss:
    """Scalar fp32 tensors: ``total`` (what is minimised) and its unweighted, detached parts."""

    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    teacher: torch.Tensor


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities [B, C] -> [B], with 0 * log 0 = 0."""
    return torch.where(log_p.isneginf(), 0.0, log_p.exp() * (log_p - log_q)).sum(-1)


def rdrop_loss(
    logits1: torch.Tensor,
    logits2: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    w_ce: float = 1.0,
    w_kl: float = 1.0,
    teacher_probs: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
    w_teacher: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> RDropLoss:
    """R-Drop loss for classification, computed in fp32.

    Args:
        logits1, logits2: [B, C] logits of the two passes; ``logits2=None`` gives plain CE.
        labels: [B] class ids; rows equal to ``ignore_index`` add nothing to CE.
        teacher_probs: [B, C] teacher class probabilities (rows sum to 1), optional.
        teacher_mask: [B] bool, the rows that have teacher probabilities (default: all).
        temperature: T of the teacher term; teacher and student are both softened by T
            (teacher: p^(1/T) renormalised) and the term is scaled by T^2 (Hinton et al.).

    Returns:
        :class:`RDropLoss` in nats: ``ce`` = mean over passes of CE averaged over labelled rows;
        ``kl`` = 0.5 * (KL(p1||p2) + KL(p2||p1)) averaged over rows; ``teacher`` = T^2 * mean
        over passes of KL(t_T || p_T) averaged over rows with a teacher; ``total`` = the
        weighted sum. A part without contributing rows is 0, never NaN.
    """
    passes = [logits1.float()] if logits2 is None else [logits1.float(), logits2.float()]
    zero = passes[0].new_zeros(())
    n_valid = (labels != ignore_index).sum()
    ce = zero
    if n_valid > 0:
        ce = sum(F.cross_entropy(lg, labels, ignore_index=ignore_index, reduction="sum") for lg in passes)
        ce = ce / (len(passes) * n_valid)
    kl = zero
    if len(passes) == 2:
        lp1, lp2 = (F.log_softmax(lg, dim=-1) for lg in passes)
        kl = 0.5 * (_kl_rows(lp1, lp2) + _kl_rows(lp2, lp1)).mean()
    teacher = zero
    if teacher_probs is not None and w_teacher:
        mask = torch.ones_like(labels, dtype=torch.bool) if teacher_mask is None else teacher_mask.bool()
        if mask.any():
            log_t = F.log_softmax(torch.log(teacher_probs.float()[mask]) / temperature, dim=-1)
            parts = [_kl_rows(log_t, F.log_softmax(lg[mask] / temperature, dim=-1)).mean() for lg in passes]
            teacher = temperature**2 * sum(parts) / len(parts)
    total = w_ce * ce + w_kl * kl + w_teacher * teacher
    return RDropLoss(total=total, ce=ce.detach(), kl=kl.detach(), teacher=teacher.detach())


def mix(ce: torch.Tensor, kd: torch.Tensor, kd_weight: float) -> torch.Tensor:
    """``(1 - a) * CE + a * KD``; a term with weight 0 is skipped (so a NaN there cannot leak)."""
    if kd_weight <= 0.0:
        return ce
    if kd_weight >= 1.0:
        return kd
    return (1.0 - kd_weight) * ce + kd_weight * kd


# -- generalized JSD over stored targets (TRL GKD's generalized_jsd_loss) --------------------
def _sparse_jsd_rows(
    x: torch.Tensor, idx: torch.Tensor, p: torch.Tensor, tail: torch.Tensor,
    *, beta: float, temperature: float, tail_bucket: bool,
) -> torch.Tensor:
    """Per-position generalized JSD for ``0 < beta < 1``: x ``[n, V]``, idx/p ``[n, K]``, tail ``[n]``.

    Over the kept classes plus the tail bucket (or the kept classes renormalised without it),
    with teacher P, student Q and mixture ``M = beta P + (1 - beta) Q``:
    ``beta KL(P || M) + (1 - beta) KL(Q || M)``.
    """
    z = x.float()
    if temperature != 1.0:
        z = z / temperature
    logq = torch.gather(z, 1, idx) - torch.logsumexp(z, -1, keepdim=True)  # [n, K]
    p = p.float()
    valid = p > 0
    lb, l1b = math.log(beta), math.log1p(-beta)
    if tail_bucket:
        logq_tail, p_tail = _student_tail(z, logq, idx, valid, tail)
    else:
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        logq = logq.masked_fill(~valid, -math.inf)
        logq = (logq - torch.logsumexp(logq, -1, keepdim=True)).masked_fill(~valid, 0.0)

    def terms(pk: torch.Tensor, logqk: torch.Tensor) -> torch.Tensor:
        # log m = log(beta p + (1 - beta) q); p = 0 gives log p = -inf, which logaddexp absorbs.
        logm = torch.logaddexp(lb + torch.log(pk), l1b + logqk)
        return beta * (torch.xlogy(pk, pk) - pk * logm) + (1.0 - beta) * logqk.exp() * (logqk - logm)

    out = terms(p, logq).masked_fill(~valid, 0.0).sum(-1)
    if tail_bucket:
        out = out + terms(p_tail, logq_tail)
    return out


def sparse_jsd_loss(
    logits: torch.Tensor,
    kd_indices: torch.Tensor,
    kd_probs: torch.Tensor,
    kd_tail: torch.Tensor,
    kd_mask: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    tail_bucket: bool = True,
    chunk_size: int = 0,
    eps: float = 1e-8,
    reduction: str = "mean",
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence (TRL GKD's ``generalized_jsd_loss``) between
    stored sparse teacher targets P and the student Q, in nats, times ``T**2``.

    Shapes as :func:`sparse_kd_loss` (``logits [..., V]``, ``kd_indices``/``kd_probs``
    ``[..., K]``, ``kd_tail``/``kd_mask`` ``[...]``). TRL's convention, matched exactly:
    ``beta = 0`` is the forward KL(P || Q) and ``beta = 1`` the reverse KL(Q || P) (both
    :func:`sparse_kd_loss`, which floors log P at ``log(eps)``); in between
    ``beta KL(P || M) + (1 - beta) KL(Q || M)`` with ``M = beta P + (1 - beta) Q``, bounded
    by ``-beta log beta - (1 - beta) log(1 - beta)`` nats. The endpoints are not the limits of
    the mixture formula (it tends to 0 at both), exactly as in TRL, so a beta sweep
    is not continuous at 0 and 1.

    Temperature: the student's logits are divided by ``temperature``; the stored targets
    are never re-tempered (they carry the capture temperature), and the result is scaled
    by ``T**2`` (TRL divides both logits by T and does not scale). With every class kept
    (K = V, tail 0) it equals TRL's dense formula; with a tail bucket it is the JSD of the
    (K+1)-class lumped distributions (a lower bound of the dense JSD).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
    if beta in (0.0, 1.0):
        return sparse_kd_loss(logits, kd_indices, kd_probs, kd_tail, kd_mask, kind="forward" if beta == 0.0 else "reverse",
                              temperature=temperature, tail_bucket=tail_bucket, chunk_size=chunk_size, eps=eps,
                              reduction=reduction)
    _check_sparse_args("forward", logits, kd_indices)

    def fn(x, idx, p, tail):
        return _sparse_jsd_rows(x, idx, p, tail, beta=beta, temperature=temperature, tail_bucket=tail_bucket)

    loss = _reduce_positions(fn, logits, kd_mask.bool(), (kd_indices, kd_probs, kd_tail), chunk_size=chunk_size, reduction=reduction)
    return loss * temperature**2


def ce_and_stored_kd_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    kd_indices: torch.Tensor,
    kd_probs: torch.Tensor,
    kd_tail: torch.Tensor,
    kd_mask: torch.Tensor,
    *,
    kind: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    tail_bucket: bool = True,
    chunk_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CE, KD)`` means against stored targets for every KD kind a recipe can name:
    ``forward``/``reverse``/``symmetric`` (:func:`ce_and_sparse_kd_loss`, one shared
    log-softmax) or ``jsd`` (:func:`ce_loss` and :func:`sparse_jsd_loss` with ``beta``)."""
    if kind == "jsd":
        return (ce_loss(logits, labels, chunk_size=chunk_size),
                sparse_jsd_loss(logits, kd_indices, kd_probs, kd_tail, kd_mask, beta=beta, temperature=temperature,
                                tail_bucket=tail_bucket, chunk_size=chunk_size))
    return ce_and_sparse_kd_loss(logits, labels, kd_indices, kd_probs, kd_tail, kd_mask, kind=kind, temperature=temperature,
                                 tail_bucket=tail_bucket, chunk_size=chunk_size)


# -- cross-tokenizer losses (student-tokenized batches, ``kdstore.align``) ---------------------
def uld_loss(
    logits: torch.Tensor,
    kd_probs: torch.Tensor,
    kd_tail: torch.Tensor,
    kd_mask: torch.Tensor,
    *,
    student_temperature: float = 1.0,
    chunk_size: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al. 2024) over stored top-k targets: the
    Wasserstein-1 distance between the teacher's and the student's *sorted* probability
    vectors, which needs no vocabulary mapping (ids are ignored).

    Per position with n kept teacher entries (``kd_probs [..., K] > 0``): the teacher's kept
    probabilities sorted descending ``p_(1..n)`` plus its tail ``kd_tail``, against the
    student's n largest probabilities ``q_(1..n)`` plus the rest of its mass::

        ULD = sum_{i<=n} |p_(i) - q_(i)| + |tail - (1 - sum_{i<=n} q_(i))|

    (the tail bucket closes the mass, as in the sparse KL). Stored targets are used as they
    are (never re-tempered); ``student_temperature`` divides the student's logits only and
    should equal the capture temperature. fp32, masked, divided by valid positions.
    """
    K = kd_probs.shape[-1]

    def fn(x: torch.Tensor, p: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        z = x.float()
        if student_temperature != 1.0:
            z = z / student_temperature
        q = torch.softmax(z, -1)
        k = min(K, q.shape[-1])
        q_top = torch.topk(q, k, dim=-1).values  # descending
        p_sorted = torch.sort(p.float()[:, :k], -1, descending=True).values
        valid = p_sorted > 0
        q_top = q_top * valid
        return (p_sorted - q_top).abs().sum(-1) + (tail.float().clamp_min(0.0) - (1.0 - q_top.sum(-1))).abs()

    return _reduce_positions(fn, logits, kd_mask.bool(), (kd_probs, kd_tail), chunk_size=chunk_size, reduction=reduction)


def chain_merged_kd_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    kd_indices: torch.Tensor,
    kd_probs: torch.Tensor,
    kd_tail: torch.Tensor,
    kd_mask: torch.Tensor,
    chain_logc: torch.Tensor,
    chain_start: torch.Tensor,
    *,
    tail_bucket: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """KD with groups merged by the chain rule (TRL GOLD's "observed" strategy), as a
    generalised KL between the two merged, unnormalised measures.

    A group (text both tokenizers end on) is scored at its start position j (``kd_mask``):
    the teacher side is its stored distribution ``p`` (in student ids) times
    ``C_t = exp(chain_logc[j])``, the product of the teacher's probabilities of the actual
    later teacher tokens of the group; the student side is ``q_j`` times ``C_s``, the
    product of its probabilities of the actual later student tokens (the positions with
    ``chain_start == j``; labels give the tokens). For measures ``a = C_t p``, ``b = C_s q``::

        D(a || b) = sum a log(a / b) - sum a + sum b = C_t (KL(p || q) + log C_t - log C_s) - C_t + C_s

    which is the sparse forward KL (tail bucket) where a group has one token on both sides.
    Returns the mean over ``kd_mask`` positions (fp32; 0 when there are none).
    """
    B, T, V = logits.shape
    lsm = F.log_softmax(logits.float(), -1)
    ce_m = labels != IGNORE_INDEX
    lab_lp = torch.gather(lsm, -1, labels.clamp_min(0)[..., None]).squeeze(-1) * ce_m
    in_group = (chain_start >= 0) & ce_m
    log_cs = torch.zeros(B, T, dtype=lsm.dtype, device=lsm.device)
    log_cs = log_cs.scatter_add(1, chain_start.clamp_min(0), torch.where(in_group, lab_lp, 0.0))
    m = kd_mask.bool()
    if not m.any():
        return logits.sum().float() * 0.0
    rows = lsm[m]
    idx = kd_indices[m]
    kl = _sparse_terms(rows, torch.gather(rows, 1, idx), idx, kd_probs[m], kd_tail[m], kind="forward",
                       tail_bucket=tail_bucket, eps=eps)
    logc = chain_logc[m].float()
    lcs = log_cs[m]
    ct = logc.exp()
    per = ct * (kl + logc - lcs) - ct + lcs.exp()
    return per.sum() / m.sum()
