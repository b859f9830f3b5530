"""The reader's fused decode kernel (``kdstore/_native.c``), with the numpy path as fallback.

:func:`decode_rows` decodes stored codes of a shard's rows straight into the caller's
output layout (flat entries, or a padded ``[S, T, K]`` batch with its per-position columns)
in one pass per position: cumulative sum of the index gaps, rank -> id (the
store's index order), code -> probability (lookup table) and, when the store codes a tail,
the joint renormalisation of kept probabilities and tail (:meth:`kdstore.Store.decode_raw`
documents the semantics; its numpy code is the reference the kernel is tested against in
``tests/test_native.py``).

The extension is optional (built by ``pip install`` where a C compiler exists). Without it,
or with ``KDSTORE_NATIVE=0`` in the environment, :data:`AVAILABLE` is False and the store and
dataset use numpy (same values up to float32 rounding of the renormalisation sum; the
dataset's batches come about 1.5x slower: ``bench/reader_bench.py``). :func:`token_ids` is the
store's hash -> id lookup in C.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from kdstore.errors import StoreFormatError

try:
    if os.environ.get("KDSTORE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        raise ImportError("disabled by KDSTORE_NATIVE")
    from kdstore import _native  # type: ignore[attr-defined]
except ImportError as exc:  # no compiler at install time, or disabled: numpy path
    _native = None
    WHY_NOT = str(exc)
else:
    WHY_NOT = ""

#: True when the compiled kernel is importable and enabled.
AVAILABLE = _native is not None

# Status codes of the kernel (kdstore/_native.c).
_OK, _DUP, _RANGE, _CODE, _VOCAB = range(5)


def describe() -> str:
    """One line for ``kd store inspect`` and benchmarks: which decode path runs."""
    return "native kernel (kdstore._native)" if AVAILABLE else f"numpy ({WHY_NOT or 'kdstore._native not built'})"


def repeated_index_error(where: str) -> StoreFormatError:
    """A zero gap after a position's first entry (shared with the numpy path)."""
    return StoreFormatError(f"{where}: a position repeats a kept index (zero gap); the shard is corrupt")


def index_range_error(where: str, index: int, vocab_size: int) -> StoreFormatError:
    """A stored index outside the teacher's vocabulary (shared with the numpy path)."""
    return StoreFormatError(f"{where}: index {index} >= teacher vocab size {vocab_size}; the shard is corrupt or from another teacher")


def _i64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def token_ids(hashes: np.ndarray, table: np.ndarray, bits: int) -> tuple[np.ndarray, int, int]:
    """Token hashes ``[N]`` -> teacher ids ``[N]`` int64 through :func:`kdstore.hashtable.build`'s
    ordered linear-probing ``table [M, 2]`` uint64 of (hash, id) pairs keyed by the top
    ``bits`` hash bits (requires :data:`AVAILABLE`). Returns ``(ids, missing,
    first_missing)``; ids of hashes not in the table are -1."""
    if _native is None:
        raise RuntimeError(f"the native decode kernel is not available: {WHY_NOT}")
    out = np.empty(len(hashes), dtype=np.int64)
    missing, first = _native.token_ids(np.ascontiguousarray(hashes, dtype=np.uint64), np.ascontiguousarray(table, dtype=np.uint64),
                                       int(bits), out)
    return out, missing, first


def decode_rows(
    *,
    gaps: np.ndarray,
    pcodes: np.ndarray,
    tail_codes: np.ndarray,
    counts: np.ndarray | None,
    pos_entries: np.ndarray | None,
    tokens: np.ndarray | None,
    row_pos: np.ndarray,
    row_len: np.ndarray,
    row_out: np.ndarray,
    row_ctx: np.ndarray | None = None,
    row_ent: np.ndarray | None = None,
    row_pad: np.ndarray | None = None,
    where: str,
    **tables_and_outputs,
) -> None:
    """Decode R rows of one source into preallocated outputs (requires :data:`AVAILABLE`).

    Source (one shard's undecoded codes, :class:`kdstore.rows.RawRows`): ``gaps``/``pcodes``
    ``[E_src]`` and ``tail_codes`` ``[P_src]`` unsigned codes; ``counts`` ``[P_src]`` kept
    entries per position with ``pos_entries`` ``[P_src]`` int64 their first entry, or None
    (top-k: ``fixed_k`` each); ``tokens`` ``[P_src]`` int64 teacher ids or None.
    ``tables_and_outputs``: the keyword arguments of :func:`bound_decoder` (``fixed_k``,
    ``k_out``, the tables and the outputs below).

    Rows: row r is source positions ``row_pos[r] : row_pos[r] + row_len[r]``, written to
    output positions ``row_out[r] + t`` (flat index into ``[S * T]``); ``row_ctx[r]`` its
    overlap context (positions before it get ``kd_mask`` 0 and label -100).

    Entries of output position q go to slots ``q * k_out ...`` of ``out_idx`` (int64) and
    ``out_probs`` (float32) (padded ``[S, T, k_out]``), or, with ``k_out=0``, row after row
    from ``row_ent[r]`` (flat ``[E]``). ``ptable``/``ttable``: float32 code -> probability;
    ``ttable=None`` (sample mode) writes tail 0 and does not renormalise. ``order``:
    ``[vocab_size]`` uint32 rank -> id, or None. Per output position (``[S * T]``, each
    optional but ``out_tail``): ``out_tail`` float32, ``out_counts``/``out_ids``/
    ``out_labels`` int64 (label: the row's next token, -100 at its last position and in its
    context), ``out_mask``/``out_kd_mask`` bool. Without ``row_pad`` only the rows' positions
    and their first ``count`` slots are written (the caller zero-fills the rest); with
    ``row_pad`` ``[R]`` int64 (padded layout only), output positions ``row_out[r] + row_len[r]
    ...`` + ``row_pad[r]`` are padding, and they and every slot past a position's count are
    written as a zero-filled batch holds them (label -100), so outputs may come from
    ``np.empty`` when the rows' spans and pads tile the output. Raises :class:`StoreFormatError` naming ``where`` for a corrupt shard
    (zero gap, index >= vocab, code outside its table).
    """
    bound_decoder(**tables_and_outputs)(
        [(gaps, pcodes, tail_codes, counts, pos_entries, tokens, len(row_pos))], row_pos, row_len, row_out, row_ctx, row_ent,
        row_pad, where)


def bound_decoder(
    *,
    ptable: np.ndarray,
    ttable: np.ndarray | None,
    order: np.ndarray | None,
    vocab_size: int,
    fixed_k: int,
    k_out: int,
    out_idx: np.ndarray,
    out_probs: np.ndarray,
    out_tail: np.ndarray,
    out_counts: np.ndarray | None = None,
    out_ids: np.ndarray | None = None,
    out_labels: np.ndarray | None = None,
    out_mask: np.ndarray | None = None,
    out_kd_mask: np.ndarray | None = None,
):
    """:func:`decode_rows` with the tables and outputs bound once, for rows of several
    sources (requires :data:`AVAILABLE`).

    Returns ``decode(sources, row_pos, row_len, row_out, row_ctx, row_ent, row_pad, where)``,
    positional: ``sources`` a sequence of ``(gaps, pcodes, tail_codes, counts, pos_entries,
    tokens, n_rows)`` tuples (each as in :func:`decode_rows`), source i's rows being the next
    ``n_rows`` of the row arrays; ``where`` a string, or one per source (the error names the
    source at fault). One call decodes every shard of a batch into the same outputs. Why:
    a call through :func:`decode_rows`'s keywords costs ~5 us, the kernel's argument checks
    ~1.2 us, and a batch draws from several shards.
    """
    if _native is None:
        raise RuntimeError(f"the native decode kernel is not available: {WHY_NOT}")
    # Arrays go to the kernel as they are: it checks each one's dtype, contiguity and size
    # (TypeError naming the argument), so a call costs no conversions.
    bound = (ptable, ttable, order, out_idx, out_probs, out_tail, out_counts, out_ids, out_labels, out_mask, out_kd_mask,
             int(fixed_k), int(k_out), int(vocab_size))
    kernel, vocab = _native.decode_rows, int(vocab_size)

    def decode(sources, row_pos, row_len, row_out, row_ctx, row_ent, row_pad, where: str | Sequence[str]) -> None:
        status, bad, src = kernel(sources, row_pos, row_len, row_out, row_ctx, row_ent, row_pad, *bound)
        if status != _OK:
            _raise_status(status, bad, where if isinstance(where, str) else where[src], vocab)

    return decode


def _raise_status(status: int, bad: int, where: str, vocab_size: int) -> None:
    """The error for a kernel status other than OK; ``bad`` is the offending value or row."""
    if status == _DUP:
        raise repeated_index_error(where)
    if status == _VOCAB:
        raise index_range_error(where, bad, vocab_size)
    if status == _CODE:
        raise StoreFormatError(f"{where}: probability code {bad} outside the store's quantization table; the shard is corrupt")
    # _RANGE: offsets outside the arrays: the caller's plan, not the shard, is wrong.
    raise IndexError(f"{where}: row {bad} of the decode plan points outside the source or output arrays")
