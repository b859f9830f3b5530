"""Quantization of probabilities and choice of index types.

Probabilities use a **log-domain** code (the same mapping for kept probabilities and tail
mass). For ``bits`` b, codes ``0 .. 2^b - 2`` stand for

    p̂(c) = exp(-c * s),   s = L / (2^b - 2),

and the all-ones code ``2^b - 1`` stands for exactly 0. Encoding is
``c = min(round(-ln p / s), 2^b - 2)`` for p > 0. ``L`` is the covered log range:

=====  ======  =================  ===========================================
bits   L       smallest p̂ (≈)    bound for p >= e^-L
=====  ======  =================  ===========================================
8      16      1.1e-7             |ln p̂ - ln p| <= s/2 = 0.0315 (3.2 % rel.)
16     48      1.4e-21            |ln p̂ - ln p| <= s/2 = 3.7e-4 (0.037 % rel.)
=====  ======  =================  ===========================================

For 0 < p < e^-L the code saturates and |p̂ - p| <= e^-L. A log-domain code is used
because a distillation loss is a KL divergence, whose second-order term is
``sum_i p_i * (relative error_i)^2 / 2``: a bounded *relative* error is what keeps it
small, and a linear code gives rare tokens 100 % relative error (see
``bench/store_bench.py`` for linear-vs-log measurements).

``sample`` mode stores exact integer draw counts instead (``count`` scheme): the target is
``counts / samples``, which is the unbiased RS-KD estimator.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

LOG_RANGE = {8: 16.0, 16: 48.0}


@dataclass(frozen=True)
class LogQuantizer:
    """Log-domain probability code; see the module docstring for the exact mapping."""

    bits: int

    def __post_init__(self) -> None:
        if self.bits not in LOG_RANGE:
            raise ValueError(f"quantization bits must be 8 or 16, got {self.bits}")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.bits == 8 else np.uint16)

    @property
    def zero_code(self) -> int:
        return (1 << self.bits) - 1

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
        """Probabilities (any float array, values in [0, 1]) -> codes of ``self.dtype``."""
        p = np.asarray(p, dtype=np.float64)
        with np.errstate(divide="ignore"):
            c = np.rint(-np.log(np.clip(p, 0.0, 1.0)) / self.step)
        c = np.minimum(c, self.zero_code - 1)
        c = np.where(p > 0, c, self.zero_code)
        return c.astype(self.dtype)

    def table(self) -> np.ndarray:
        """Decode table: ``table()[code]`` is the float32 probability of ``code``."""
        return _log_table(self.bits)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.table()[np.asarray(codes)]


@lru_cache(maxsize=None)
def _log_table(bits: int) -> np.ndarray:
    q = LogQuantizer(bits)
    t = np.exp(-np.arange(q.zero_code + 1, dtype=np.float64) * q.step)
    t[q.zero_code] = 0.0
    t = t.astype(np.float32)
    t.setflags(write=False)
    return t


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
