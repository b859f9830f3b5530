"""Quantization of probabilities, index coding and the choice of integer types.

Probability codes (``Manifest.quantization.probs`` / ``.tail``), exact mappings in
``docs/format.md``; ``M = 2^bits - 1``:

``sqrt`` (default)
    ``c = round(M * sqrt(p))``; decode ``p̂(c) = (c / M)^2`` for ``c >= 1`` and
    ``p̂(0) = 1 / (12 M^2)`` (the mean of p over code 0's bucket). Bound for every
    ``p`` in [0, 1]: ``|sqrt(p̂) - sqrt(p)| <= 1 / (2M)``, hence
    ``|p̂ - p| <= sqrt(p) / M + 1 / (4 M^2)``. Uniform steps in ``sqrt(p)`` make every kept
    entry contribute about the same ``Δ²/6`` (Δ = 1/M) to the forward KL of the
    renormalised distribution, ``KL ≈ 2 Σ (sqrt(p) - sqrt(q))^2 ≈ (k+1) / (6 M^2)``
    nats/position (8 bits: 2.6e-6 per kept entry), which is the entropy-constrained optimum
    for a forward-KL loss: small probabilities, which barely enter the KL, share few codes,
    so the codes compress well (``bench/store_bench.py``, k=32: 0.68 B/entry against
    0.91 for the 8-bit log code at the same mean KL, 8e-5 nats/position).
``log``
    codes ``0 .. M-1`` stand for ``p̂(c) = exp(-c s)``, ``s = L / (M - 1)``, and code ``M``
    for exactly 0; ``c = min(round(-ln p / s), M - 1)`` for p > 0. ``L`` = 16 (8 bits) or
    48 (16 bits). Bound: ``|ln p̂ - ln p| <= s/2`` (8 bits: 0.0315, 16 bits: 3.7e-4) for
    ``p >= e^-L``; below, ``|p̂ - p| <= e^-L``. Bounded *relative* error everywhere is what
    reverse-KL or JSD losses (which weight ``log p_teacher`` by the student's mass) need;
    for forward KL it spends bits on tiny probabilities.
``count`` (``sample`` mode)
    exact integer draw counts; the target is ``counts / samples`` (the unbiased RS-KD
    estimator).

Index coding: within a position, entries are stored in ascending teacher-index order and
the indices as gaps (first = the index itself, then differences, all >= 1), in the
narrowest unsigned type of the padded vocabulary (:func:`index_dtype`). The set of kept
ids costs ~log2 C(V, k) bits, while probability order adds log2(k!) bits of permutation
that zstd cannot remove; measured in ``bench/store_bench.py`` and ``docs/format.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

LOG_RANGE = {8: 16.0, 16: 48.0}
SCHEMES = ("sqrt", "log")


@dataclass(frozen=True)
class _Quantizer:
    bits: int

    def __post_init__(self) -> None:
        if self.bits not in (8, 16):
            raise ValueError(f"quantization bits must be 8 or 16, got {self.bits}")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.bits == 8 else np.uint16)

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    def table(self) -> np.ndarray:
        """Decode table: ``table()[code]`` is the float32 probability of ``code``."""
        return _table(type(self).__name__, self.bits)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes (any shape) -> float32 probabilities of the same shape."""
        return np.take(self.table(), np.asarray(codes))

    def _table64(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, p: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class SqrtQuantizer(_Quantizer):
    """Square-root probability code (the default); see the module docstring."""

    scheme = "sqrt"

    @property
    def max_sqrt_error(self) -> float:
        """Bound on ``|sqrt(p̂) - sqrt(p)|`` for every ``p`` in [0, 1]."""
        return 0.5 / self.max_code

    def encode(self, p: np.ndarray) -> np.ndarray:
        """Probabilities (values in [0, 1]; NaN -> 0) -> codes of ``self.dtype``."""
        p = np.nan_to_num(np.asarray(p, dtype=np.float64), nan=0.0)
        return np.rint(np.sqrt(np.clip(p, 0.0, 1.0)) * self.max_code).astype(self.dtype)

    def _table64(self) -> np.ndarray:
        m = self.max_code
        t = (np.arange(m + 1, dtype=np.float64) / m) ** 2
        t[0] = 1.0 / (12.0 * m * m)
        return t


@dataclass(frozen=True)
class LogQuantizer(_Quantizer):
    """Log-domain probability code with a zero code; see the module docstring."""

    scheme = "log"

    @property
    def zero_code(self) -> int:
        return self.max_code

    @property
    def log_range(self) -> float:
        return LOG_RANGE[self.bits]

    @property
    def step(self) -> float:
        return self.log_range / (self.zero_code - 1)

    @property
    def max_log_error(self) -> float:
        """Bound on |ln p̂ - ln p| for p >= exp(-log_range)."""
        return self.step / 2

    def encode(self, p: np.ndarray) -> np.ndarray:
        """Probabilities (values in [0, 1]; NaN -> 0) -> codes of ``self.dtype``."""
        p = np.nan_to_num(np.asarray(p, dtype=np.float64), nan=0.0)
        with np.errstate(divide="ignore"):
            c = np.rint(-np.log(np.clip(p, 0.0, 1.0)) / self.step)
        c = np.minimum(c, self.zero_code - 1)
        c = np.where(p > 0, c, self.zero_code)
        return c.astype(self.dtype)

    def _table64(self) -> np.ndarray:
        t = np.exp(-np.arange(self.zero_code + 1, dtype=np.float64) * self.step)
        t[self.zero_code] = 0.0
        return t


_CLASSES = {"sqrt": SqrtQuantizer, "log": LogQuantizer}


def quantizer(scheme: str, bits: int) -> SqrtQuantizer | LogQuantizer:
    """The probability code ``scheme`` ("sqrt" or "log") with ``bits`` (8 or 16)."""
    if scheme not in _CLASSES:
        raise ValueError(f"unknown probability code {scheme!r}; expected one of {SCHEMES}")
    return _CLASSES[scheme](bits)


@lru_cache(maxsize=None)
def _table(cls_name: str, bits: int) -> np.ndarray:
    q = {c.__name__: c for c in _CLASSES.values()}[cls_name](bits)
    t = q._table64().astype(np.float32)
    t.setflags(write=False)
    return t


# -- index coding ------------------------------------------------------------------------------
def sort_entries(indices: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Permutation ``[E]`` that sorts entries by (position, index).

    ``indices [E]`` grouped by position, ``counts [P]`` entries per position.
    """
    indices = np.asarray(indices, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    if len(counts) and (counts == counts[0]).all() and counts[0] * len(counts) == len(indices):
        # Fixed k (top-k): a row-wise sort of a [P, k] view is ~3x faster than lexsort.
        k = int(counts[0])
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        order = np.argsort(indices.reshape(-1, k), axis=1, kind="stable")
        return (order + (np.arange(len(counts), dtype=np.int64) * k)[:, None]).ravel()
    pos = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    return np.lexsort((indices, pos))


def delta_encode(sorted_indices: np.ndarray, entry_offsets: np.ndarray) -> np.ndarray:
    """Gaps of indices sorted ascending within each position (first entry: the index).

    ``entry_offsets [P+1]``; returns int64 ``[E]``. A gap of 0 after a position's first
    entry means a duplicate index (callers reject it).
    """
    s = np.asarray(sorted_indices, dtype=np.int64)
    gaps = np.empty_like(s)
    if len(s):
        gaps[0] = s[0]
        np.subtract(s[1:], s[:-1], out=gaps[1:])
        starts = np.asarray(entry_offsets[:-1])
        starts = starts[starts < len(s)]
        gaps[starts] = s[starts]
    return gaps


def delta_decode(gaps: np.ndarray, entry_offsets: np.ndarray) -> np.ndarray:
    """Inverse of :func:`delta_encode`: a cumulative sum restarted at every position.

    ``gaps [E]`` (any unsigned/int dtype), ``entry_offsets [P+1]`` int64 -> int64 ``[E]``.
    """
    c = np.asarray(gaps).astype(np.int64)
    np.cumsum(c, out=c)  # in place on int64: much faster than cumsum(dtype=...) on narrow ints
    if len(c) == 0:
        return c
    counts = np.diff(entry_offsets)
    starts = np.asarray(entry_offsets[:-1])[counts > 0]
    # The running sum before each position's first entry, subtracted from all its entries.
    base = c[starts] - np.asarray(gaps[starts], dtype=np.int64)
    c -= np.repeat(base, counts[counts > 0])
    return c


def count_dtype(samples: int) -> np.dtype:
    """Narrowest unsigned type that holds draw counts up to ``samples``."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if samples <= 0xFF:
        return np.dtype(np.uint8)
    if samples <= 0xFFFF:
        return np.dtype(np.uint16)
    raise ValueError(f"samples={samples} is too large: at most 65535 draws per position are supported")


def index_dtype(vocab_size: int) -> np.dtype:
    """Narrowest unsigned integer type that holds indices ``0 .. vocab_size - 1``."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"vocab_size={vocab_size} does not fit uint32 indices")
