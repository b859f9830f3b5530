"""Fused chunked LM head + CE + sparse KD equals the unfused loss, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.core.fused import fused_ce_and_sparse_kd
from trainer.core.losses import ce_and_stored_kd_loss, mix


def _batch(B=3, T=11, H=16, V=97, K=6, pad=0.3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    valid = torch.rand(B, T, generator=g) > pad
    labels[~valid] = -100
    teacher = torch.softmax(torch.randn(B, T, V, generator=g) * 3, -1)
    p, idx = teacher.topk(K, -1)
    p[..., -1] = 0.0  # a padding slot, as the dataset pads short positions
    tail = (1 - p.sum(-1)).clamp_min(0)
    return hidden, weight, labels, idx, p.to(dtype), tail.to(dtype), valid


def _unfused(hidden, weight, bias, labels, idx, p, tail, mask, a, **kw):
    logits = F.linear(hidden, weight, bias)
    ce, kd = ce_and_stored_kd_loss(logits, labels, idx, p, tail, mask, **kw)
    return mix(ce, kd, a), ce, kd


@pytest.mark.parametrize("kind", ["forward", "reverse", "symmetric", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail_bucket", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_values_and_gradients_equal_the_unfused_loss(kind, temperature, tail_bucket, chunk):
    hidden, weight, labels, idx, p, tail, mask = _batch()
    kw = dict(kind=kind, temperature=temperature, tail_bucket=tail_bucket)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, ce, kd = fused_ce_and_sparse_kd(h1, w1, labels, idx, p, tail, mask, kd_weight=0.7, chunk_size=chunk, **kw)
    ref, ref_ce, ref_kd = _unfused(h2, w2, None, labels, idx, p, tail, mask, 0.7, **kw)
    (loss * 1.5).backward()
    (ref * 1.5).backward()
    torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ref_ce.detach().float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd, ref_kd.detach().float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-6)


def test_bias_and_bf16_hidden_states():
    hidden, weight, labels, idx, p, tail, mask = _batch(dtype=torch.float32, seed=3)
    bias = torch.randn(weight.shape[0]) * 0.1
    h1, b1 = hidden.bfloat16().requires_grad_(), bias.clone().requires_grad_()
    h2, b2 = hidden.bfloat16().float().requires_grad_(), bias.clone().requires_grad_()
    loss, _, _ = fused_ce_and_sparse_kd(h1, weight, labels, idx, p, tail, mask, kd_weight=0.5, bias=b1, chunk_size=5)
    ref, _, _ = _unfused(h2, weight, b2, labels, idx, p, tail, mask, 0.5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert h1.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h1.grad.float(), h2.grad, rtol=2e-2, atol=1e-4)  # bf16 rounding of the result
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-4, atol=1e-6)


def test_ce_only_matches_hand_computed_cross_entropy():
    hidden, weight, labels, idx, p, tail, mask = _batch(seed=4)
    loss, ce, _ = fused_ce_and_sparse_kd(hidden, weight, labels, idx, p, tail, mask, kd_weight=0.0, chunk_size=4)
    logits = hidden @ weight.T
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, want.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ce, want.float(), rtol=1e-6, atol=1e-7)


def test_all_masked_gives_zero_and_zero_gradients_not_nan():
    hidden, weight, labels, idx, p, tail, mask = _batch(seed=5)
    labels[:] = -100
    mask[:] = False
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, ce, kd = fused_ce_and_sparse_kd(h, w, labels, idx, p, tail, mask, kd_weight=0.5, chunk_size=3)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(ce) == 0.0 and float(kd) == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_bad_shapes_are_clear_errors():
    hidden, weight, labels, idx, p, tail, mask = _batch()
    with pytest.raises(ValueError, match="not \\[V, 16\\]"):
        fused_ce_and_sparse_kd(hidden, weight.T, labels, idx, p, tail, mask, kd_weight=0.5)
    with pytest.raises(ValueError, match="student vocabulary"):
        fused_ce_and_sparse_kd(hidden, weight[:10], labels, idx, p, tail, mask, kd_weight=0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_ce_and_sparse_kd(hidden, weight, labels, idx, p, tail, mask, kd_weight=0.5, chunk_size=0)
