"""KD losses against hand-computed values and their defining properties."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.core.losses import ce_and_dense_kd_loss, ce_and_sparse_kd_loss, ce_loss, dense_kd_loss, mix, sparse_kd_loss

# Student logits ln(1..4): softmax q = [0.1, 0.2, 0.3, 0.4].
Q = [0.1, 0.2, 0.3, 0.4]
LOGITS = torch.log(torch.tensor([[[1.0, 2.0, 3.0, 4.0]]]))  # [B=1, T=1, V=4]
# Teacher keeps classes 3 and 2 with p = 0.5, 0.3; tail 0.2 (classes 0 and 1).
IDX = torch.tensor([[[3, 2]]])
P = torch.tensor([[[0.5, 0.3]]])
TAIL = torch.tensor([[0.2]])
MASK = torch.tensor([[True]])
# Hand-computed: student tail bucket = q0 + q1 = 0.3.
FWD = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.3) + 0.2 * math.log(0.2 / 0.3)
REV = 0.4 * math.log(0.4 / 0.5) + 0.3 * math.log(0.3 / 0.3) + 0.3 * math.log(0.3 / 0.2)


def test_sparse_forward_reverse_symmetric_hand_computed():
    f = sparse_kd_loss(LOGITS, IDX, P, TAIL, MASK, kind="forward")
    r = sparse_kd_loss(LOGITS, IDX, P, TAIL, MASK, kind="reverse")
    s = sparse_kd_loss(LOGITS, IDX, P, TAIL, MASK, kind="symmetric")
    assert f.item() == pytest.approx(FWD, abs=1e-6)
    assert r.item() == pytest.approx(REV, abs=1e-6)
    assert s.item() == pytest.approx(0.5 * (FWD + REV), abs=1e-6)
    assert f.dtype == torch.float32


def test_sparse_without_tail_bucket_renormalises_kept_entries():
    # Target [0.5, 0.3] / 0.8 against the student's full-softmax log-probs of classes 3, 2.
    p = [0.5 / 0.8, 0.3 / 0.8]
    want = p[0] * math.log(p[0] / 0.4) + p[1] * math.log(p[1] / 0.3)
    got = sparse_kd_loss(LOGITS, IDX, P, TAIL, MASK, tail_bucket=False)
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_padding_slots_are_not_kept_classes():
    # Same target with a padding slot (index 0, probability 0): class 0 stays in the tail.
    idx = torch.tensor([[[3, 2, 0]]])
    p = torch.tensor([[[0.5, 0.3, 0.0]]])
    assert sparse_kd_loss(LOGITS, idx, p, TAIL, MASK).item() == pytest.approx(FWD, abs=1e-6)
    assert sparse_kd_loss(LOGITS, idx, p, TAIL, MASK, kind="reverse").item() == pytest.approx(REV, abs=1e-6)


def test_temperature_divides_student_logits_and_scales_by_t_squared():
    # Logits 2*ln(1..4) at T=2 are ln(1..4): the same KL, times T^2 = 4.
    got = sparse_kd_loss(2 * LOGITS, IDX, P, TAIL, MASK, temperature=2.0)
    assert got.item() == pytest.approx(4 * FWD, abs=1e-5)
    teacher = torch.log(torch.tensor([[[0.05, 0.15, 0.3, 0.5]]]))
    dense_t1 = sum(pt * math.log(pt / q) for pt, q in zip([0.05, 0.15, 0.3, 0.5], Q))
    got_dense = dense_kd_loss(2 * LOGITS, 2 * teacher, MASK, temperature=2.0)
    assert got_dense.item() == pytest.approx(4 * dense_t1, abs=1e-5)


def test_stored_targets_are_not_re_tempered():
    # The stored [0.5, 0.3 | tail 0.2] is the target at any T; only the student is divided by T.
    # Logits 2*ln(1..4) at T=2 give the student q = [0.1, 0.2, 0.3, 0.4] again, so the value is
    # T^2 * FWD; a re-tempered target (p^(1/T) renormalised over kept + tail) would give a different one.
    got = sparse_kd_loss(2 * LOGITS, IDX, P, TAIL, MASK, temperature=2.0)
    assert got.item() == pytest.approx(4 * FWD, abs=1e-5)
    rt = [math.sqrt(v) for v in (0.5, 0.3, 0.2)]
    rt = [v / sum(rt) for v in rt]
    re_tempered = 4 * (rt[0] * math.log(rt[0] / 0.4) + rt[1] * math.log(rt[1] / 0.3) + rt[2] * math.log(rt[2] / 0.3))
    assert abs(got.item() - re_tempered) > 1e-2


def test_reduction_none_gives_per_position_values_zero_outside_the_mask():
    # Position 0: the hand-computed FWD; position 1 (masked out): 0; position 2: a one-kept-class
    # target [1.0], tail 0, against q = [0.1, 0.2, 0.3, 0.4]: -log 0.1 ... times T^2 = 1.
    logits = LOGITS.expand(1, 3, 4)
    idx = torch.tensor([[[3, 2], [3, 2], [0, 1]]])
    p = torch.tensor([[[0.5, 0.3], [0.5, 0.3], [1.0, 0.0]]])
    tail = torch.tensor([[0.2, 0.2, 0.0]])
    mask = torch.tensor([[True, False, True]])
    got = sparse_kd_loss(logits, idx, p, tail, mask, reduction="none")
    assert got.shape == (1, 3)
    torch.testing.assert_close(got, torch.tensor([[FWD, 0.0, -math.log(0.1)]]), rtol=1e-5, atol=1e-6)
    assert float(got.sum()) == pytest.approx(float(sparse_kd_loss(logits, idx, p, tail, mask, reduction="sum")), rel=1e-6)


def test_ce_and_mix_hand_computed():
    labels = torch.tensor([[2]])
    ce = ce_loss(LOGITS, labels)
    assert ce.item() == pytest.approx(-math.log(0.3), abs=1e-6)
    kd = sparse_kd_loss(LOGITS, IDX, P, TAIL, MASK)
    assert mix(ce, kd, 0.25).item() == pytest.approx(0.75 * -math.log(0.3) + 0.25 * FWD, abs=1e-6)
    assert mix(ce, torch.tensor(float("nan")), 0.0).item() == pytest.approx(-math.log(0.3))


def _random_case(B=2, T=5, V=11, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    teacher = torch.randn(B, T, V, generator=g) * 2
    p_full = torch.softmax(teacher, -1)
    vals, idx = torch.topk(p_full, K, -1)
    tail = 1 - vals.sum(-1)
    mask = torch.rand(B, T, generator=g) > 0.3
    return logits, teacher, p_full, idx, vals, tail, mask


@pytest.mark.parametrize("kind", ["forward", "reverse", "symmetric"])
def test_sparse_with_all_classes_kept_equals_dense(kind):
    V = 11
    logits, teacher, p_full, idx, vals, tail, mask = _random_case(V=V, K=V)
    sparse = sparse_kd_loss(logits, idx, vals, torch.zeros_like(tail), mask, kind=kind)
    dense = dense_kd_loss(logits, teacher, mask, kind=kind)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-6)
    # Quantization noise in the tail of a position that keeps every class is ignored.
    noisy = sparse_kd_loss(logits, idx, vals, torch.full_like(tail, 1e-7), mask, kind=kind)
    assert noisy.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-6)


def test_dense_kl_against_explicit_sum():
    logits, teacher, p_full, *_, mask = _random_case()
    q = torch.log_softmax(logits, -1)
    lp = torch.log_softmax(teacher, -1)
    per = (p_full * (lp - q)).sum(-1)
    want = per[mask].mean()
    assert dense_kd_loss(logits, teacher, mask).item() == pytest.approx(want.item(), rel=1e-6)


def test_sparse_forward_kl_is_a_lower_bound_of_dense_and_zero_at_the_teacher():
    logits, teacher, p_full, idx, vals, tail, mask = _random_case(K=3)
    sparse = sparse_kd_loss(logits, idx, vals, tail, mask)
    dense = dense_kd_loss(logits, teacher, mask)
    assert 0 < sparse.item() <= dense.item()  # merging classes never increases KL
    at_teacher = sparse_kd_loss(teacher, idx, vals, tail, mask)
    assert abs(at_teacher.item()) < 1e-5


@pytest.mark.parametrize("kind", ["forward", "reverse", "symmetric"])
def test_chunked_equals_unchunked_values_and_gradients(kind):
    logits, teacher, p_full, idx, vals, tail, mask = _random_case(B=3, T=7, V=13, K=4, seed=1)
    results = []
    for chunk in (0, 3):
        x = logits.clone().requires_grad_(True)
        loss = sparse_kd_loss(x, idx, vals, tail, mask, kind=kind, chunk_size=chunk) + dense_kd_loss(
            x, teacher, mask, kind=kind, chunk_size=chunk) + ce_loss(x, torch.where(mask, idx[..., 0], -100), chunk_size=chunk)
        loss.backward()
        results.append((loss.detach(), x.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-7)


def test_all_masked_batch_gives_zero_loss_and_zero_grad_not_nan():
    logits, teacher, p_full, idx, vals, tail, _ = _random_case()
    none = torch.zeros(logits.shape[:-1], dtype=torch.bool)
    x = logits.clone().requires_grad_(True)
    total = (sparse_kd_loss(x, idx, vals, tail, none) + dense_kd_loss(x, teacher, none)
             + ce_loss(x, torch.full(none.shape, -100)) + sparse_kd_loss(x, idx, vals, tail, none, kind="reverse", chunk_size=2))
    assert total.item() == 0.0
    total.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_masked_positions_do_not_contribute_and_mean_is_over_valid_positions():
    logits, teacher, p_full, idx, vals, tail, mask = _random_case()
    garbage = logits.clone()
    garbage[~mask] = 1e4  # whatever sits in masked positions must not matter
    a = sparse_kd_loss(logits, idx, vals, tail, mask)
    b = sparse_kd_loss(garbage, idx, vals, tail, mask)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    per = [sparse_kd_loss(logits[i : i + 1, t : t + 1], idx[i : i + 1, t : t + 1], vals[i : i + 1, t : t + 1],
                          tail[i : i + 1, t : t + 1], mask[i : i + 1, t : t + 1]).item()
           for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]]
    assert a.item() == pytest.approx(sum(per) / len(per), rel=1e-6)


def test_sample_mode_frequencies_are_an_unbiased_target():
    """Stored draw frequencies (tail 0): the forward-KL gradient in expectation equals the
    full-distribution gradient (RS-KD is unbiased), unlike top-k renormalised targets."""
    V, S, draws = 6, 4, 4000
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(V, generator=g), -1)
    logits = torch.randn(1, 1, V, generator=g)
    x = logits.clone().requires_grad_(True)
    dense_kd_loss(x, torch.log(p).view(1, 1, V), torch.ones(1, 1, dtype=torch.bool)).backward()
    want = x.grad.clone()
    # Many independent sampled targets as positions of one batch: the mean gradient over positions.
    d = torch.multinomial(p, draws * S, replacement=True, generator=g).view(draws, S)
    # As stored: unique ids per position with their draw frequencies (padding: prob 0).
    counts = torch.zeros(draws, V).scatter_add_(1, d, torch.ones(draws, S))
    idx = torch.arange(V).expand(draws, V)
    freq = counts / S
    xs = logits.expand(1, draws, V).clone().requires_grad_(True)
    sparse_kd_loss(xs, idx.reshape(1, draws, V), freq.view(1, draws, V), torch.zeros(1, draws),
                   torch.ones(1, draws, dtype=torch.bool)).backward()
    got = xs.grad.sum(1).view(V)  # mean over positions is folded into the loss's 1/n
    assert torch.allclose(got, want.view(V), atol=0.02)
    # A top-2 target renormalised (no tail) is biased: its gradient is far from the full one.
    vals, top = torch.topk(p, 2)
    xt = logits.clone().requires_grad_(True)
    sparse_kd_loss(xt, top.view(1, 1, 2), vals.view(1, 1, 2), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool),
                   tail_bucket=False).backward()
    assert (xt.grad.view(V) - want.view(V)).abs().max() > 0.05


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="student vocabulary"):
        sparse_kd_loss(LOGITS, torch.tensor([[[7, 2]]]), P, TAIL, MASK)
    with pytest.raises(ValueError, match="unknown KD loss kind"):
        sparse_kd_loss(LOGITS, IDX, P, TAIL, MASK, kind="jsd")
    with pytest.raises(ValueError, match="teacher vocabulary"):
        dense_kd_loss(LOGITS, torch.zeros(1, 1, 5), MASK)


def test_dense_pads_student_extra_classes_with_zero_teacher_mass():
    teacher = torch.log(torch.tensor([[[0.2, 0.3, 0.5]]]))  # V' = 3 < V = 4
    want = sum(pt * math.log(pt / q) for pt, q in zip([0.2, 0.3, 0.5], Q))
    assert dense_kd_loss(LOGITS, teacher, MASK).item() == pytest.approx(want, abs=1e-6)


def test_bf16_logits_are_computed_in_fp32():
    logits, teacher, p_full, idx, vals, tail, mask = _random_case()
    a = sparse_kd_loss(logits.bfloat16(), idx, vals, tail, mask)
    b = sparse_kd_loss(logits.bfloat16().float(), idx, vals, tail, mask)
    assert a.dtype == torch.float32 and a.item() == pytest.approx(b.item(), rel=1e-6)


def _reference_sparse(logits, idx, p, tail, kind):
    """Float64 (K+1)-bucket KL per position, the definition written out directly."""
    z = logits.double()
    q = torch.softmax(z, -1)
    qk = torch.gather(q, -1, idx)
    q_tail = (1 - qk.sum(-1)).clamp_min(1e-300)
    p, tail = p.double(), tail.double()
    fwd = (p * (p.log() - qk.log())).sum(-1) + tail * (tail.log() - q_tail.log())
    rev = (qk * (qk.log() - p.log())).sum(-1) + q_tail * (q_tail.log() - tail.log())
    per = {"forward": fwd, "reverse": rev, "symmetric": 0.5 * (fwd + rev)}[kind]
    return per.mean()


@pytest.mark.parametrize("kind", ["forward", "reverse", "symmetric"])
@pytest.mark.parametrize("confident", [False, True])
def test_sparse_matches_float64_definition_values_and_gradients(kind, confident):
    """Both tail computations: log(1 - kept mass) for ordinary rows, and the exact
    log-sum-exp over non-kept classes when the student's kept mass is within 1e-3 of 1."""
    logits, teacher, p_full, idx, vals, tail, _ = _random_case(B=2, T=4, V=50, K=5, seed=7)
    if confident:
        logits = logits.scatter_add(-1, idx, torch.full(idx.shape, 14.0))  # kept mass ~ 1 - 1e-5
    mask = torch.ones(logits.shape[:-1], dtype=torch.bool)
    x = logits.clone().requires_grad_(True)
    got = sparse_kd_loss(x, idx, vals, tail, mask, kind=kind)
    got.backward()
    xr = logits.double().requires_grad_(True)
    want = _reference_sparse(xr, idx, vals, tail, kind)
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    assert torch.allclose(x.grad.double(), xr.grad, rtol=1e-3, atol=1e-6)


def _grads(fn, logits):
    x = logits.clone().requires_grad_(True)
    ce, kd = fn(x)
    (0.3 * ce + 0.7 * kd).backward()
    return ce.detach(), kd.detach(), x.grad


@pytest.mark.parametrize("kind", ["forward", "reverse", "symmetric"])
@pytest.mark.parametrize("tail_bucket", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("padding_heavy", [False, True])
def test_fused_ce_and_sparse_kd_equal_the_separate_losses(kind, tail_bucket, temperature, padding_heavy):
    logits, _, _, idx, vals, tail, _ = _random_case(B=3, T=6, V=40, K=6, seed=3)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 40, (3, 6), generator=g)
    labels[0, :2] = -100  # unlabelled positions
    kd_mask = torch.ones(3, 6, dtype=torch.bool)
    kd_mask[2, 4:] = False  # a KD mask that differs from the label mask
    if padding_heavy:  # short rows: most positions are padding (the compacted-rows path)
        labels[:, 3:] = -100
        kd_mask[:, 3:] = False
        kd_mask[1, 5] = True  # a KD target where there is no label
    kw = dict(kind=kind, tail_bucket=tail_bucket, temperature=temperature)
    ce_f, kd_f, g_f = _grads(lambda x: ce_and_sparse_kd_loss(x, labels, idx, vals, tail, kd_mask, **kw), logits)
    ce_s, kd_s, g_s = _grads(lambda x: (ce_loss(x, labels), sparse_kd_loss(x, idx, vals, tail, kd_mask, **kw)), logits)
    assert ce_f.item() == pytest.approx(ce_s.item(), rel=1e-5)
    assert kd_f.item() == pytest.approx(kd_s.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(g_f, g_s, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("valid_len", [6, 3])
def test_fused_ce_and_dense_kd_equal_the_separate_losses(kind, valid_len):
    logits, teacher, *_ = _random_case(B=2, T=8, V=30, K=3, seed=5)
    labels = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, valid_len:] = False
    labels[1, valid_len:] = -100
    labels[0, 7] = -100
    ce_f, kd_f, g_f = _grads(lambda x: ce_and_dense_kd_loss(x, labels, teacher[..., :27], mask, kind=kind), logits)
    ce_s, kd_s, g_s = _grads(lambda x: (ce_loss(x, labels), dense_kd_loss(x, teacher[..., :27], mask, kind=kind)), logits)
    assert (ce_f.item(), kd_f.item()) == (pytest.approx(ce_s.item(), rel=1e-5), pytest.approx(kd_s.item(), rel=1e-5))
    assert torch.allclose(g_f, g_s, rtol=1e-4, atol=1e-7)


def test_fused_losses_all_masked_are_zero_not_nan():
    logits, teacher, _, idx, vals, tail, _ = _random_case(B=2, T=4, V=12, K=3)
    labels = torch.full((2, 4), -100)
    none = torch.zeros(2, 4, dtype=torch.bool)
    for fn in (lambda x: ce_and_sparse_kd_loss(x, labels, idx, vals, tail, none),
               lambda x: ce_and_dense_kd_loss(x, labels, teacher, none)):
        ce, kd, grad = _grads(fn, logits)
        assert ce.item() == 0.0 and kd.item() == 0.0 and torch.count_nonzero(grad) == 0
