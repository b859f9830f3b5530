"""Generalized JSD over stored sparse targets and the dispatcher over every stored-target KD
kind (``kd_loss=forward|reverse|symmetric|jsd``); see :mod:`trainer.core.losses`."""

from __future__ import annotations

import math

import torch

from trainer.core.losses._kd import (
    _check_sparse_args, _reduce_positions, _student_tail, ce_and_sparse_kd_loss, ce_loss, sparse_kd_loss,
)


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
