"""Sparse selection of teacher distributions: top-k, adaptive top-p, and sampling (RS-KD).

All functions take logits on any device and return small tensors on the same device, so
the capture pipeline moves only ``[N, K]`` arrays off the accelerator, never ``[N, V]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Sparse:
    """Kept entries for ``N`` positions, padded to ``K`` columns.

    indices: ``[N, K]`` int64 teacher vocabulary ids (0 in padding).
    probs:   ``[N, K]`` float32 target probabilities, descending per row (0 in padding).
             For ``sample`` mode these are draw frequencies ``counts / samples``.
    counts:  ``[N]`` int64 number of kept entries per position (``K`` for top-k).
    tail:    ``[N]`` float32 teacher mass outside the kept entries, ``1 - sum(p_kept)``
             (for ``sample`` mode: the teacher mass not covered by any draw).
    """

    indices: torch.Tensor
    probs: torch.Tensor
    counts: torch.Tensor
    tail: torch.Tensor

    def to_numpy(self) -> "Sparse":
        return Sparse(*(t.detach().cpu().numpy() for t in (self.indices, self.probs, self.counts, self.tail)))

    def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Numpy ``(indices [E], probs [E], counts [N], tail [N])`` with padding dropped."""
        s = self.to_numpy() if isinstance(self.indices, torch.Tensor) else self
        keep = np.arange(s.indices.shape[1])[None, :] < s.counts[:, None]
        return s.indices[keep], s.probs[keep], s.counts.astype(np.int64), s.tail


def select(
    logits: torch.Tensor,
    *,
    mode: str,
    k: int | None = None,
    p: float | None = None,
    max_k: int | None = None,
    samples: int | None = None,
    temperature: float = 1.0,
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Sparse:
    """Select kept entries from ``logits [N, V]`` (any float dtype; computed in fp32).

    ``uniforms [N, samples]`` in [0, 1) drive ``sample`` mode by inverse-CDF sampling; the
    capture pipeline derives them from (seed, sample id, position) so results do not depend
    on how samples were batched. Without them, ``torch.rand`` with ``generator`` is used.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    n, v = probs.shape
    if mode == "topk":
        if not k or k < 1:
            raise ValueError("topk selection needs k >= 1")
        vals, idx = torch.topk(probs, min(k, v), dim=-1)
        counts = torch.full((n,), vals.shape[1], dtype=torch.int64, device=probs.device)
        return Sparse(idx, vals, counts, (1.0 - vals.sum(-1)).clamp_min(0.0))
    if mode == "top_p":
        if p is None or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p selection needs 0 < p <= 1, got {p}")
        if not max_k or max_k < 1:
            raise ValueError("top_p selection needs max_k >= 1")
        vals, idx = torch.topk(probs, min(max_k, v), dim=-1)
        # Keep the fewest entries whose cumulative mass reaches p: entry j is kept when the
        # mass strictly before it is still < p.
        before = torch.cumsum(vals, dim=-1) - vals
        keep = before < p
        keep[:, 0] = True
        counts = keep.sum(-1)
        vals = torch.where(keep, vals, torch.zeros_like(vals))
        idx = torch.where(keep, idx, torch.zeros_like(idx))
        kmax = int(counts.max()) if n else 1
        return Sparse(idx[:, :kmax], vals[:, :kmax], counts, (1.0 - vals.sum(-1)).clamp_min(0.0))
    if mode == "sample":
        if not samples or samples < 1:
            raise ValueError("sample selection needs samples >= 1")
        if uniforms is None:
            uniforms = torch.rand((n, samples), generator=generator, device=probs.device)
        elif tuple(uniforms.shape) != (n, samples):
            raise ValueError(f"uniforms must be [N, samples] = {(n, samples)}, got {tuple(uniforms.shape)}")
        # Inverse CDF in float64 so the last bucket is reachable even for V ~ 1e5.
        cdf = torch.cumsum(probs.double(), dim=-1)
        cdf = cdf / cdf[:, -1:]
        draws = torch.searchsorted(cdf, uniforms.to(cdf.device, torch.float64), right=True).clamp_max(v - 1)
        return _counts_from_draws(draws, probs, samples)
    raise ValueError(f"unknown selection mode {mode!r}; expected topk, top_p or sample")


def _counts_from_draws(draws: torch.Tensor, probs: torch.Tensor, samples: int) -> Sparse:
    """Unique draws per row with their counts, most frequent first."""
    d, _ = torch.sort(draws, dim=-1)
    is_new = torch.ones_like(d, dtype=torch.bool)
    is_new[:, 1:] = d[:, 1:] != d[:, :-1]
    gid = torch.cumsum(is_new.long(), dim=-1) - 1
    cnt = torch.zeros_like(d).scatter_add_(1, gid, torch.ones_like(d))
    uniq = torch.zeros_like(d).scatter_(1, gid, d)
    counts = is_new.sum(-1)
    # Most frequent first; ties by index (stable sort on an index-sorted row).
    order = torch.sort(cnt, dim=-1, descending=True, stable=True).indices
    cnt = torch.gather(cnt, 1, order)
    uniq = torch.gather(uniq, 1, order)
    kmax = int(counts.max()) if d.shape[0] else 1
    cnt, uniq = cnt[:, :kmax], uniq[:, :kmax]
    covered = torch.where(cnt > 0, torch.gather(probs, 1, uniq), torch.zeros_like(cnt, dtype=probs.dtype))
    return Sparse(uniq, cnt.float() / samples, counts, (1.0 - covered.sum(-1)).clamp_min(0.0))


def sample_uniforms(keys: list[int], positions: list[int], samples: int, seed: int) -> np.ndarray:
    """Deterministic uniforms ``[sum(positions), samples]`` for ``sample`` mode.

    Row r gets a Philox stream keyed by ``(seed, keys[r])`` (e.g. the sample id as an
    integer), so the draws for a sample are independent of batching and worker layout.
    """
    out = [
        np.random.Generator(np.random.Philox(key=[seed & (2**64 - 1), key & (2**64 - 1)])).random((npos, samples))
        for key, npos in zip(keys, positions)
    ]
    return np.concatenate(out, axis=0) if out else np.zeros((0, samples))
