"""R-Drop loss for sequence classification (``kd train rdrop``); see :mod:`trainer.core.losses`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
