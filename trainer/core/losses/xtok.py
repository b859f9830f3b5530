"""Cross-tokenizer losses over student-tokenized batches (:mod:`kdstore.align`): ULD over
sorted probabilities, and KD with 1:n groups merged by the chain rule; see
:mod:`trainer.core.losses` for the shared conventions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.core.losses._kd import IGNORE_INDEX, _reduce_positions, _sparse_terms


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
