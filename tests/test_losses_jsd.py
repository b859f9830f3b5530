"""Generalized JSD over stored sparse targets, against TRL GKD's formula and the KL losses.

TRL's ``generalized_jsd_loss`` is re-implemented below line for line from
``trl/experimental/gkd/gkd_trainer.py`` (huggingface/trl at f2cd57710, the method
``GKDTrainer.generalized_jsd_loss``), so the test does not need TRL installed and fails if
kdstore's beta convention or mixture drifts from TRL's.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.core.losses import sparse_jsd_loss, sparse_kd_loss


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0, reduction="batchmean"):
    """TRL's formula (copied semantics: F.kl_div(input, target) = KL(target || input))."""
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta), teacher_log_probs + torch.log(beta)]), dim=0)
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    assert reduction == "batchmean"
    denom = mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1)
    return jsd.sum() / denom


def _dense_case(seed: int = 0, B: int = 2, T: int = 5, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = labels[1, 4] = -100
    return s, t, labels


def _all_kept(teacher_probs: torch.Tensor):
    """Every class kept: indices 0..V-1, probabilities = the teacher's, tail 0."""
    B, T, V = teacher_probs.shape
    return torch.arange(V).expand(B, T, V).contiguous(), teacher_probs.float(), torch.zeros(B, T)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_equals_trl_formula_on_the_dense_case(beta):
    s, t, labels = _dense_case()
    idx, p, tail = _all_kept(F.softmax(t, -1))
    want = trl_generalized_jsd_loss(s, t, labels, beta=beta)
    got = sparse_jsd_loss(s.float(), idx, p, tail, labels != -100, beta=beta)
    assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_temperature_stored_targets_not_retempered_and_t_squared(beta):
    # kdstore: the store holds softmax(teacher / T) (captured at T); only the student is divided
    # by T here, and the result is multiplied by T^2. TRL divides both logits by T, no T^2.
    T = 2.0
    s, t, labels = _dense_case(seed=1)
    idx, p, tail = _all_kept(F.softmax(t / T, -1))
    want = T**2 * trl_generalized_jsd_loss(s, t, labels, beta=beta, temperature=T)
    got = sparse_jsd_loss(s.float(), idx, p, tail, labels != -100, beta=beta, temperature=T)
    assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)


def test_hand_computed_with_tail_bucket():
    # Student q = [0.1, 0.2, 0.3, 0.4]; teacher keeps classes 3, 2 with 0.5, 0.3 and tail 0.2:
    # P = (0.5, 0.3, 0.2), Q = (0.4, 0.3, 0.3) over (class 3, class 2, tail).
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0, 4.0]]]))
    P, Q, b = [0.5, 0.3, 0.2], [0.4, 0.3, 0.3], 0.25
    M = [b * p + (1 - b) * q for p, q in zip(P, Q)]
    want = b * sum(p * math.log(p / m) for p, m in zip(P, M)) + (1 - b) * sum(q * math.log(q / m) for q, m in zip(Q, M))
    got = sparse_jsd_loss(logits, torch.tensor([[[3, 2]]]), torch.tensor([[[0.5, 0.3]]]), torch.tensor([[0.2]]),
                          torch.tensor([[True]]), beta=b)
    assert got.item() == pytest.approx(want, abs=1e-7)
    assert got.dtype == torch.float32


def _sparse_case(seed: int = 2, B: int = 3, T: int = 6, V: int = 50, K: int = 5):
    """Top-K targets with a tail, padded slots (probability 0) and masked positions."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    full = F.softmax(torch.randn(B, T, V, generator=g) * 3, -1)
    p, idx = full.topk(K, -1)
    p[0, 0, 3:] = 0.0  # a position with fewer kept entries (padding slots)
    idx[0, 0, 3:] = 0
    tail = 1 - p.sum(-1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 2] = mask[2, 5] = False
    return logits, idx, p, tail, mask


@pytest.mark.parametrize("tail_bucket", [True, False])
def test_beta_0_and_1_are_the_forward_and_reverse_losses_and_the_limits_agree(tail_bucket):
    logits, idx, p, tail, mask = _sparse_case()
    fwd = sparse_kd_loss(logits, idx, p, tail, mask, kind="forward", tail_bucket=tail_bucket)
    rev = sparse_kd_loss(logits, idx, p, tail, mask, kind="reverse", tail_bucket=tail_bucket)
    assert sparse_jsd_loss(logits, idx, p, tail, mask, beta=0.0, tail_bucket=tail_bucket).item() == fwd.item()
    assert sparse_jsd_loss(logits, idx, p, tail, mask, beta=1.0, tail_bucket=tail_bucket).item() == rev.item()
    # The mixture code itself: JSD_beta / beta -> KL(P || Q) as beta -> 0 and
    # JSD_beta / (1 - beta) -> KL(Q || P) as beta -> 1 (first-order expansion of the mixture).
    # Peaked teachers make the second-order term large (chi-square), hence the tiny betas.
    near0 = sparse_jsd_loss(logits, idx, p, tail, mask, beta=1e-5, tail_bucket=tail_bucket) / 1e-5
    near1 = sparse_jsd_loss(logits, idx, p, tail, mask, beta=1 - 1e-4, tail_bucket=tail_bucket) / 1e-4
    if tail_bucket:  # without the bucket the forward KL uses the unrenormalised student (see sparse_kd_loss)
        assert near0.item() == pytest.approx(fwd.item(), rel=5e-3)
    assert near1.item() == pytest.approx(rev.item(), rel=5e-3)


def test_without_tail_bucket_is_trl_on_the_renormalised_kept_classes():
    logits, idx, p, tail, mask = _sparse_case()
    s_kept = torch.gather(logits, -1, idx)  # softmax over kept logits = student renormalised over kept
    s_kept = s_kept.masked_fill(p == 0, -math.inf)
    t_kept = torch.log(p / p.sum(-1, keepdim=True))
    labels = torch.where(mask, 0, -100)
    # TRL's F.kl_div has 0 * log 0 = 0 but -inf - -inf = nan in the padded slots: drop them via a
    # finite floor (both sides have probability exactly 0 there).
    want = trl_generalized_jsd_loss(s_kept.clamp_min(-1e4), t_kept.clamp_min(-1e4), labels, beta=0.4)
    got = sparse_jsd_loss(logits, idx, p, tail, mask, beta=0.4, tail_bucket=False)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_chunked_equals_unchunked_values_and_gradients():
    logits, idx, p, tail, mask = _sparse_case(B=4, T=7)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    la = sparse_jsd_loss(a, idx, p, tail, mask, beta=0.5, temperature=1.5)
    lb = sparse_jsd_loss(b, idx, p, tail, mask, beta=0.5, temperature=1.5, chunk_size=3)
    la.backward()
    lb.backward()
    assert lb.item() == pytest.approx(la.item(), rel=1e-6)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)


def test_mean_divides_by_valid_positions_and_all_masked_is_zero():
    logits, idx, p, tail, mask = _sparse_case()
    per = sparse_jsd_loss(logits, idx, p, tail, mask, beta=0.5, reduction="sum")
    mean = sparse_jsd_loss(logits, idx, p, tail, mask, beta=0.5)
    assert mean.item() == pytest.approx(per.item() / int(mask.sum()), rel=1e-6)
    x = logits.clone().requires_grad_()
    zero = sparse_jsd_loss(x, idx, p, tail, torch.zeros_like(mask), beta=0.5)
    zero.backward()
    assert zero.item() == 0.0 and torch.isfinite(x.grad).all() and not x.grad.any()


def test_every_class_kept_gives_finite_gradients_and_bounded_values():
    s, t, labels = _dense_case(V=6)
    idx, p, tail = _all_kept(F.softmax(t, -1))
    tail = tail + 1e-3  # quantization noise in a stored tail must be ignored when all classes are kept
    x = s.float().requires_grad_()
    b = 0.3
    loss = sparse_jsd_loss(x, idx, p, tail, labels != -100, beta=b)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert 0 < loss.item() <= -b * math.log(b) - (1 - b) * math.log(1 - b)


def test_bad_beta_is_rejected():
    logits, idx, p, tail, mask = _sparse_case()
    with pytest.raises(ValueError, match="beta must be in"):
        sparse_jsd_loss(logits, idx, p, tail, mask, beta=1.5)


def test_ce_and_stored_kd_loss_dispatches_every_kind():
    from trainer.core.losses import ce_and_sparse_kd_loss, ce_and_stored_kd_loss, ce_loss

    logits, idx, p, tail, mask = _sparse_case()
    labels = torch.where(mask, 3, -100)
    for kind in ("forward", "reverse", "symmetric"):
        got = ce_and_stored_kd_loss(logits, labels, idx, p, tail, mask, kind=kind, temperature=1.5)
        want = ce_and_sparse_kd_loss(logits, labels, idx, p, tail, mask, kind=kind, temperature=1.5)
        assert [x.item() for x in got] == [x.item() for x in want]
    ce, kd = ce_and_stored_kd_loss(logits, labels, idx, p, tail, mask, kind="jsd", beta=0.3)
    assert ce.item() == ce_loss(logits, labels).item()
    assert kd.item() == sparse_jsd_loss(logits, idx, p, tail, mask, beta=0.3).item()
