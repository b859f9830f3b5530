"""Fused, chunked LM head + CE + sparse KD: the student loss without ``[N, V]`` logits.

At the vocabularies people distil (V = 151,936 for Qwen2.5) a student's fp32 logits are
600 KB per position: 8k positions are 5 GB, and log-softmax plus its gradient triple that.
:func:`fused_ce_and_sparse_kd` takes the hidden states before the LM head instead and, as
Liger-Kernel's fused linear losses do, walks the positions in chunks: per chunk it computes
the logits ``h_c @ W.T`` in fp32, the CE and sparse-KD terms (with the one implementation
in :mod:`trainer.core.losses`), and their gradients with respect to ``h_c`` and ``W`` right
away, then drops the chunk. The backward pass only scales the stored gradients. Peak
memory: one chunk's ``[chunk, V]`` fp32 logits and their gradient, plus ``dL/dW`` (the size
of the head), whatever N is.

Values and gradients equal :func:`trainer.core.losses.ce_and_stored_kd_loss` (every stored-
target KD kind: forward, reverse, symmetric, jsd) on the full logits followed by
:func:`trainer.core.losses.mix` (tested), including the temperature rule
(stored targets are never re-tempered; the student is divided by T and KD scaled by T**2).
The difference from Liger: the gradient comes from autograd on each chunk's fp32 logits
(not from a hand-written kernel), so every loss variant in ``losses.py`` is available and
stays one implementation; the cost is one extra fp32 ``[chunk, V]`` buffer per chunk.
"""

from __future__ import annotations

import torch

from trainer.core.losses import IGNORE_INDEX, ce_and_stored_kd_loss, mix

DEFAULT_CHUNK = 1024


def _chunk_objective(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, p: torch.Tensor, tail: torch.Tensor,
                     m: torch.Tensor, *, n_ce: int, n_kd: int, kd_weight: float, kw: dict) -> tuple[torch.Tensor, ...]:
    """This chunk's share of ``mix(CE, KD)`` (CE and KD are means over the whole batch) and its
    CE and KD sums, from logits ``x [n, V]`` fp32."""
    ce_c, kd_c = ce_and_stored_kd_loss(x, y, idx, p, tail, m, **kw)
    ce_sum = ce_c * int((y != IGNORE_INDEX).sum())
    kd_sum = kd_c * int(m.sum())
    total = mix(ce_sum / max(n_ce, 1), kd_sum / max(n_kd, 1), kd_weight)
    return total, ce_sum.detach(), kd_sum.detach()


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, idx, probs, tail, mask, kd_weight, chunk, kw):  # noqa: D102
        n_ce, n_kd = int((labels != IGNORE_INDEX).sum()), int(mask.sum())
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        w32 = weight.float()
        b32 = None if bias is None else bias.float()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce_sum, kd_sum = total.clone(), total.clone()
        # Only rows either loss needs: padding costs neither a matmul nor a softmax.
        rows = ((labels != IGNORE_INDEX) | mask).nonzero().squeeze(1)
        for s in range(0, rows.numel(), chunk):
            r = rows[s:s + chunk]
            h_c = hidden.index_select(0, r).float()
            with torch.enable_grad():
                x = torch.nn.functional.linear(h_c, w32, b32).detach().requires_grad_(True)
                t_c, ce_c, kd_c = _chunk_objective(
                    x, labels[r], idx[r], probs[r], tail[r], mask[r], n_ce=n_ce, n_kd=n_kd, kd_weight=kd_weight, kw=kw)
                (g,) = torch.autograd.grad(t_c, x)
            grad_h.index_copy_(0, r, (g @ w32).to(hidden.dtype))
            grad_w.addmm_(g.t(), h_c)
            if grad_b is not None:
                grad_b += g.sum(0)
            total += t_c.detach()
            ce_sum += ce_c
            kd_sum += kd_c
            del x, g
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype))
        ctx.has_bias = bias is not None
        ce, kd = ce_sum / max(n_ce, 1), kd_sum / max(n_kd, 1)
        ctx.mark_non_differentiable(ce, kd)  # logged, not trained on: their gradient lives in ``total``
        return total, ce, kd

    @staticmethod
    def backward(ctx, g_total, _g_ce, _g_kd):  # noqa: D102
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh, gw = grad_h * g_total.to(grad_h.dtype), grad_w * g_total.to(grad_w.dtype)
        gb = grad_b * g_total.to(grad_b.dtype) if ctx.has_bias else None
        return gh, gw, gb, None, None, None, None, None, None, None, None


def fused_ce_and_sparse_kd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    kd_indices: torch.Tensor,
    kd_probs: torch.Tensor,
    kd_tail: torch.Tensor,
    kd_mask: torch.Tensor,
    *,
    kd_weight: float,
    bias: torch.Tensor | None = None,
    kind: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    tail_bucket: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kd)`` with ``loss = (1 - kd_weight) * CE + kd_weight * KD`` (differentiable
    in ``hidden`` and ``weight``/``bias``; ``ce``, ``kd`` detached, nats).

    Args:
        hidden: ``[..., H]`` the student's final hidden states (any float dtype).
        weight: ``[V, H]`` LM head (tied embeddings work: the gradient goes to that tensor).
        labels: ``[...]`` next-token ids, -100 ignored. ``kd_indices`` / ``kd_probs``
            ``[..., K]``, ``kd_tail`` / ``kd_mask`` ``[...]``: the dataset's batch tensors.
        chunk_size: positions per chunk (peak memory ~ 3 * chunk * V * 4 bytes).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight {tuple(weight.shape)} is not [V, {H}] for hidden {tuple(hidden.shape)}")
    lead = hidden.shape[:-1]
    if labels.shape != lead or kd_mask.shape != lead or kd_indices.shape[:-1] != lead:
        raise ValueError(f"labels {tuple(labels.shape)}, kd_mask {tuple(kd_mask.shape)} and kd_indices "
                         f"{tuple(kd_indices.shape)} must match hidden {tuple(hidden.shape)} without its last axis")
    if kd_indices.numel() and int(kd_indices.max()) >= weight.shape[0]:
        raise ValueError(f"teacher index {int(kd_indices.max())} >= student vocabulary {weight.shape[0]}: resize the "
                         "student's embeddings to the store's (or alignment's) vocab_size")
    K = kd_indices.shape[-1]
    kw = dict(kind=kind, beta=beta, temperature=temperature, tail_bucket=tail_bucket)
    return _FusedLinearKD.apply(
        hidden.reshape(-1, H), weight, bias, labels.reshape(-1), kd_indices.reshape(-1, K), kd_probs.reshape(-1, K),
        kd_tail.reshape(-1), kd_mask.reshape(-1).bool(), float(kd_weight), int(chunk_size), kw)
