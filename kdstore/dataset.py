"""Torch streaming over a store: deterministic shuffling, rank/worker sharding, exact resume.

Data order is a pure function of ``(seed, epoch, shard row counts, rank, world_size,
batch_size)``: shards are permuted, grouped into blocks of ``shuffle_block`` shards, and
rows are permuted within each block (so a worker holds at most a block of shards in
memory). Ranks take every ``world_size``-th row of that order; batches are consecutive
chunks of a rank's rows, and DataLoader worker ``w`` of ``W`` produces batches
``start + w, start + w + W, ...``, which the DataLoader hands out round-robin, so the
batch sequence is the same for any number of workers. Resume state is therefore a tiny
dict (epoch, batches consumed): see :class:`StoreLoader`. Within a batch, rows are grouped
by shard (see ``SoftLabelDataset._decode_rows``).

Memory and I/O: each DataLoader worker reads every shard of the current block (a block's
rows are spread over all batches; with W workers a block is read W times), ``read_threads``
threads per worker (default 2) load the next block while the current one is decoded, and shards are
dropped after their last batch. Keep about 2 x ``shuffle_block`` x shard size x W within
memory (shards are held with their stored code widths, ~3 B per kept entry), plus, per read
thread, one shard's file while it is read and checked against its checksum.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Protocol

import numpy as np
import torch
import xxhash
from torch.utils.data import IterableDataset, get_worker_info

from kdstore import native
from kdstore.order import _dist_defaults, epoch_order  # noqa: F401 - epoch_order re-exported
from kdstore.packing import _packing_tensors, pack_rows, plan_packing  # noqa: F401 - pack_rows re-exported
from kdstore.loader import StoreLoader  # noqa: F401 - re-exported (kdstore.dataset.StoreLoader)
from kdstore.prefetch import ShardPrefetcher
from kdstore.store import TARGET_COLUMNS, DecodedRows, RawRows, Store, open as open_store

IGNORE_INDEX = -100
_TEXT_COLUMNS = ("text", "byte_start", "byte_end")


class TargetRemap(Protocol):
    """Vocabulary remapping applied to decoded rows (see :mod:`kdstore.align`)."""

    vocab_size: int

    def map_targets(
        self, indices: np.ndarray, probs: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...

    def map_inputs(self, ids: np.ndarray) -> np.ndarray: ...


class SoftLabelDataset(IterableDataset):
    """Batches of decoded soft labels from a store (use with ``DataLoader(batch_size=None)``
    or, for resumable training, :class:`StoreLoader`).

    Token-level batches (B rows, T = longest row, K = most kept entries in the batch):

    - ``input_ids`` ``[B, T]`` long: teacher token ids (or ``remap.map_inputs`` of them); 0 in padding
    - ``attention_mask`` ``[B, T]`` bool
    - ``labels`` ``[B, T]`` long: the next token id; ``-100`` at the last position of a row,
      in padding and in overlap context (``context_len``)
    - ``kd_indices`` ``[B, T, K]`` long, ``kd_probs`` ``[B, T, K]`` float32 (0 in padding),
      ``kd_tail`` ``[B, T]`` float32 (mass outside the kept entries; ``probs.sum(-1) + tail == 1``)
    - ``kd_mask`` ``[B, T]`` bool: the position has a teacher target
    - ``kd_counts`` ``[B, T]`` long: kept entries per position (slots ``>= count`` are padding);
      entries of a position are in storage order (ascending id or rank, ``docs/format.md``; the top entry is ``kd_probs.argmax(-1)``)
    - ``sample_id`` list of B str, ``window`` ``[B]`` long, ``batch_index`` int

    With ``sequence=`` (a :class:`kdstore.align.SequenceAligner`) batches are in the
    **student's own tokenization** of each row's stored text (the store needs ``text`` and
    byte offsets): the alignment runs here, in the DataLoader workers, on the same
    deterministic row order, so resuming works as above (keys: see
    :func:`kdstore.align.collate.collate_aligned`).

    With ``pack=True`` (token level) the same B rows are packed, whole, into S <= B
    sequences of a length L between T and 2T (first-fit decreasing, :func:`plan_packing`):
    every tensor above is ``[S, L(, K)]`` instead of ``[B, T(, K)]``, ``attention_mask`` is replaced by
    ``position_ids`` ``[S, T]`` (restarting at 0 at each row: pass them to a Hugging Face
    model *without* an attention mask and it masks attention per row), ``valid_mask`` ``[S,
    T]`` bool marks real positions and ``doc_index`` ``[S, T]`` long the batch row of each
    position (-1 in padding). The rows of a batch, hence order, resume and losses, do not
    change; only the padding does.

    Sequence-level stores give ``kd_indices``/``kd_probs`` ``[B, K]``, ``kd_tail`` and ``kd_counts`` ``[B]``, and
    ``labels`` ``[B]`` (-100 where the store has no label).

    Speed: with the native kernel (:mod:`kdstore.native`, built at install where a C
    compiler exists) token-level batches without ``remap``/``sequence`` are decoded straight
    into these tensors; otherwise numpy decodes and collates (same tensors). ``read_threads``
    shards are read at a time, in background threads, ahead of the batches that need them
    (2: reading is the bulk of the work and one read does not keep two cores busy;
    ``bench/reader_bench.py``).
    """

    def __init__(
        self,
        store: Store | str,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_block: int = 4,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
        remap: TargetRemap | None = None,
        sequence: Any = None,
        pack: bool = False,
        read_threads: int = 2,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if read_threads < 1:
            raise ValueError(f"read_threads must be >= 1, got {read_threads}")
        self.read_threads = int(read_threads)
        self.store = open_store(store) if isinstance(store, str) else store
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_block = shuffle_block
        self.rank, self.world_size = _dist_defaults(rank, world_size)
        self.drop_last = drop_last
        self.remap = remap
        self.sequence = sequence
        if pack and sequence is not None:
            raise ValueError("pack=True packs teacher-tokenized rows; batches in the student's own tokenization "
                             "(sequence=) are not packed: pass one of the two")
        self.pack = pack
        self.epoch = 0
        self.start_batch = 0
        self._shard_rows = [s.rows for s in self.store.shards]
        self._offsets = np.concatenate([[0], np.cumsum(self._shard_rows, dtype=np.int64)])
        self._columns = list(TARGET_COLUMNS) + (["label"] if "label" in self.store.schema.names else [])
        sel = self.store.manifest.selection
        self._fixed_k = 0 if sel.variable else min(sel.k, self.store.manifest.teacher.vocab_size)
        if sequence is not None:
            if remap is not None:
                raise ValueError("pass either remap= (teacher tokenization) or sequence= (student tokenization), not both")
            if self.store.manifest.level != "token":
                raise ValueError(f"{self.store.uri}: sequence alignment needs a token-level store")
            missing = [c for c in _TEXT_COLUMNS if c not in self.store.schema.names]
            if missing:
                raise ValueError(
                    f"{self.store.uri}: training on the student's own tokenization needs the stored text and byte offsets "
                    f"(missing columns {missing}); re-capture with text stored (kd cache stores it unless --no-store-text)"
                )
            self._columns += list(_TEXT_COLUMNS)

    # -- order -------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Identifies the data order: same store contents and sharding parameters."""
        key = "|".join(s.checksum for s in self.store.shards)
        key += f"|{self.seed}|{self.shuffle}|{self.shuffle_block}|{self.world_size}|{self.batch_size}|{self.drop_last}"
        if self.sequence is not None:
            key += f"|seq:{self.sequence.fingerprint}"
        return xxhash.xxh3_64_hexdigest(key.encode())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_rows(self, epoch: int | None = None) -> np.ndarray:
        """Global row ids this rank reads in ``epoch``, in order.

        With ``drop_last`` the epoch order is first cut to a multiple of
        ``world_size * batch_size`` so that every rank gets the same number of full batches
        (distributed training must not run a different number of steps per rank).
        """
        order = epoch_order(
            self._shard_rows, seed=self.seed, epoch=self.epoch if epoch is None else epoch,
            shuffle=self.shuffle, shuffle_block=self.shuffle_block,
        )
        if self.drop_last:
            step = self.world_size * self.batch_size
            order = order[: len(order) // step * step]
        return order[self.rank :: self.world_size]

    def num_batches(self, epoch: int | None = None) -> int:
        n = len(self.rank_rows(epoch))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches()

    # -- iteration ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows = self.rank_rows()
        n_batches = len(rows) // self.batch_size if self.drop_last else math.ceil(len(rows) / self.batch_size)
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        first = self.start_batch + wid
        order, last_use = self._shard_plan(rows, n_batches, first, nw)
        need = self._rows_needed(rows, n_batches, first, nw)
        loader = ShardPrefetcher(lambda s: self._load_shard(s, need[s]), order, ahead=max(1, self.shuffle_block),
                                  threads=self.read_threads)
        fused = native.AVAILABLE and self.remap is None and self.store.manifest.level == "token"
        try:
            for n, j in enumerate(range(first, n_batches, nw)):
                ids = rows[j * self.batch_size : (j + 1) * self.batch_size]
                shard_of = np.searchsorted(self._offsets, ids, side="right") - 1
                if self.sequence is not None:
                    batch = self._aligned_batch(ids, shard_of, loader.get)
                elif fused:
                    batch = self._fused_batch(ids, shard_of, loader.get)
                else:
                    batch = self.collate(self._decode_rows(ids, shard_of, loader.get))
                batch["batch_index"] = j
                for s in set(shard_of.tolist()):
                    if last_use[s] == n:
                        loader.drop(s)
                yield batch
        finally:
            loader.close()

    def _shard_plan(self, rows: np.ndarray, n_batches: int, first: int, step: int) -> tuple[list[int], dict[int, int]]:
        """Shards this worker needs, in the order its batches first use them, and the ordinal
        of the last of its batches that uses each (shards are loaded ahead in a background
        thread and dropped after their last use). Vectorised over the epoch: for 10M rows
        this is a few numpy passes, not a Python loop over every batch."""
        if first >= n_batches:
            return [], {}
        b = np.arange(len(rows), dtype=np.int64) // self.batch_size
        mine = (b >= first) & (b < n_batches) & ((b - first) % step == 0)
        n = (b[mine] - first) // step  # ordinal of the batch among this worker's
        shard = np.searchsorted(self._offsets, rows[mine], side="right") - 1
        # First and last ordinal per shard (n is non-decreasing along the rows).
        k = len(self._shard_rows)
        first_n = np.full(k, np.iinfo(np.int64).max, dtype=np.int64)
        last_n = np.full(k, -1, dtype=np.int64)
        np.minimum.at(first_n, shard, n)
        np.maximum.at(last_n, shard, n)
        used = np.flatnonzero(last_n >= 0)
        first_n, last_n = first_n[used], last_n[used]
        order = used[np.lexsort((used, first_n))]
        return order.tolist(), dict(zip(used.tolist(), last_n.tolist()))

    def _rows_needed(self, rows: np.ndarray, n_batches: int, first: int, step: int) -> dict[int, np.ndarray]:
        """Shard-local rows each shard must provide to this worker's batches: a worker reads
        only the row groups holding them. The rows are ~1/W of a shard for W workers, but
        under shuffling they fall in nearly every row group (``bench/reader_bench.py``)."""
        if first >= n_batches:
            return {}
        b = np.arange(len(rows), dtype=np.int64) // self.batch_size
        mine = rows[(b >= first) & (b < n_batches) & ((b - first) % step == 0)]
        return dict(self._by_shard(mine, np.searchsorted(self._offsets, mine, side="right") - 1))

    def _by_shard(self, ids: np.ndarray, shard_of: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """``[(shard, its shard-local rows), ...]`` of the global rows ``ids`` (in shards
        ``shard_of``), shards ascending, rows in their order in ``ids`` within a shard."""
        # One stable sort groups the rows by shard: a boolean mask per shard cost ~3 us per
        # shard of every batch.
        o = np.argsort(shard_of, kind="stable")
        sh = shard_of[o]
        local = ids[o] - self._offsets[sh]
        bounds = [0, *(np.flatnonzero(sh[1:] != sh[:-1]) + 1).tolist(), len(sh)]
        return [(int(sh[a]), local[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]

    def _decode_rows(self, ids: np.ndarray, shard_of: np.ndarray, get_shard) -> DecodedRows:
        """Decode the rows ``ids`` (global row ids, in shards ``shard_of``) of one batch.

        Within a batch, rows come grouped by shard (shards in ascending order, rows in epoch
        order within a shard): a pure function of the epoch order, so resuming reproduces it.
        """
        parts, files = self._batch_parts(ids, shard_of, get_shard)
        return self.store.decode_raw(RawRows.gather(parts, fixed_k=self._fixed_k), source=f" (batch from {', '.join(files)})")

    def _batch_parts(self, ids: np.ndarray, shard_of: np.ndarray, get_shard) -> tuple[list[tuple[RawRows, np.ndarray]], list[str]]:
        """``([(loaded shard, its rows in it), ...], [its file, ...])`` for the rows ``ids`` of
        one batch, shards in ascending order (see :meth:`_decode_rows`)."""
        parts, files = [], []
        for s, local in self._by_shard(ids, shard_of):
            raw = get_shard(s)
            parts.append((raw, raw.row_map[local]))
            files.append(self.store.shards[s].file)
        return parts, files

    def _aligned_batch(self, ids: np.ndarray, shard_of: np.ndarray, get_shard) -> dict[str, Any]:
        """One batch in the student's tokenization (``sequence=``): decode the rows, gather
        their text and byte offsets in the same order, align, collate."""
        import pyarrow as pa  # noqa: PLC0415

        from kdstore.align.collate import collate_aligned  # noqa: PLC0415
        from kdstore.align.sequence import offset_lists  # noqa: PLC0415

        d = self._decode_rows(ids, shard_of, get_shard)
        parts, _ = self._batch_parts(ids, shard_of, get_shard)
        texts = pa.concat_tables([raw.text_columns.take(pa.array(rows)) for raw, rows in parts])
        where = f"{self.store.uri} (batch of {len(ids)} rows)"
        tx, off, bs, be = offset_lists(texts, where)
        rows = self.sequence.align_decoded(d, tx, off, bs, be, where=where)
        return collate_aligned(rows, pad_id=getattr(self.sequence, "pad_id", 0))

    def _load_shard(self, i: int, rows: np.ndarray) -> RawRows:
        """Undecoded rows of the row groups of shard ``i`` that hold the shard-local ``rows``
        (``raw.row_map``: shard row -> row of ``raw``): codes stay in their stored width
        (about 3 B per kept entry in memory); token hashes are mapped to ids once per load."""
        source = f"/{self.store.shards[i].file}"
        table, row_map = self.store.read_row_groups(i, rows, columns=self._columns)
        raw = self.store.raw(table, source=source)
        raw.row_map = row_map
        if self.sequence is not None:
            raw.text_columns = table.select(list(_TEXT_COLUMNS))  # read with the shard, taken per batch
        if raw.tokens is not None:
            raw.tokens = self.store.token_ids(raw.tokens, where=source)
            raw.tokens_are_ids = True
        return raw

    # -- collation ---------------------------------------------------------------------
    def _row_layout(self, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Where each of the R rows goes in the ``[S, T]`` batch: ``(seq_of_row, start_of_row,
        S, T)`` (padded: one row per sequence; packed: :func:`plan_packing`)."""
        R = len(lengths)
        if self.pack and R:
            return plan_packing(lengths)
        return np.arange(R), np.zeros(R, dtype=np.int64), R, int(lengths.max()) if R else 0

    def _layout(self, d: DecodedRows, input_ids: np.ndarray):
        """Where each of the P positions goes: ``(pos_row, pos_t, seq, col, S, T)`` (its row,
        its index in the row, and its place in the ``[S, T]`` batch: padded rows, or packed
        sequences), plus per position whether it has a target and its next-token label."""
        P = len(d.counts)
        lengths = np.diff(d.positions)
        pos_row, pos_t, seq, col, S, T = self._position_layout(lengths)
        # Per position (flat, P): the next token of the same row as label, -100 at a row's
        # last position and in overlap context; then laid out as [rows, T] or packed.
        kd_flat = pos_t >= d.context_len[pos_row]
        nxt = np.full(P, IGNORE_INDEX, dtype=np.int64)
        has_next = pos_t + 1 < lengths[pos_row]
        nxt[:-1] = np.where(has_next[:-1], input_ids[1:], IGNORE_INDEX) if P else nxt[:-1]
        label_flat = np.where(kd_flat, nxt, IGNORE_INDEX)
        return pos_row, pos_t, seq, col, S, T, kd_flat, label_flat

    def _position_layout(self, lengths: np.ndarray):
        """``(pos_row, pos_t, seq, col, S, T)`` per position of rows of ``lengths``."""
        seq_of_row, start_of_row, S, T = self._row_layout(lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
        pos_row = np.repeat(np.arange(len(lengths)), lengths)
        pos_t = np.arange(int(lengths.sum())) - starts[pos_row]
        return pos_row, pos_t, seq_of_row[pos_row], start_of_row[pos_row] + pos_t, S, T

    def collate(self, d: DecodedRows) -> dict[str, Any]:
        """Decoded rows -> padded tensors (see the class docstring)."""
        indices, probs, counts, tail = d.indices, d.probs, d.counts, d.tail
        input_ids = d.input_ids
        if self.remap is not None:
            indices, probs, counts, extra = self.remap.map_targets(indices, probs, counts)
            tail = tail + extra
            if len(input_ids):
                input_ids = self.remap.map_inputs(input_ids)
        R = d.num_rows
        P = len(counts)
        K = max(1, int(counts.max())) if P else 1
        # Fixed k (top-k without a remap): entries reshape to [P, K], no per-entry scatter.
        fixed = P > 0 and len(indices) == P * K and bool((counts == K).all())
        if fixed:
            ent_pos = slot = None
            indices_pk, probs_pk = indices.reshape(P, K), probs.reshape(P, K)
        else:
            entry_off = np.zeros(P + 1, dtype=np.int64)
            np.cumsum(counts, out=entry_off[1:])
            ent_pos = np.repeat(np.arange(P), counts)
            slot = np.arange(len(indices)) - entry_off[ent_pos]
        if self.store.manifest.level == "sequence":
            kd_idx = np.zeros((R, K), dtype=np.int64)
            kd_p = np.zeros((R, K), dtype=np.float32)
            if fixed:
                kd_idx[:], kd_p[:] = indices_pk, probs_pk
            else:
                kd_idx[ent_pos, slot] = indices
                kd_p[ent_pos, slot] = probs
            labels = d.label if d.label is not None else np.full(R, IGNORE_INDEX, dtype=np.int64)
            return {"sample_id": d.sample_id, "window": torch.from_numpy(d.window), "kd_indices": torch.from_numpy(kd_idx),
                    "kd_probs": torch.from_numpy(kd_p), "kd_tail": torch.from_numpy(tail.astype(np.float32)),
                    "labels": torch.from_numpy(labels), "kd_counts": torch.from_numpy(counts.astype(np.int64))}
        pos_row, pos_t, seq, col, S, T, kd_flat, label_flat = self._layout(d, input_ids)
        ids = np.zeros((S, T), dtype=np.int64)
        ids[seq, col] = input_ids
        mask = np.zeros((S, T), dtype=bool)
        mask[seq, col] = True
        labels = np.full((S, T), IGNORE_INDEX, dtype=np.int64)
        labels[seq, col] = label_flat
        kd_mask = np.zeros((S, T), dtype=bool)
        kd_mask[seq, col] = kd_flat
        if fixed and not self.pack and P == R * T:  # every row has T positions: reshape, no scatter
            kd_idx, kd_p = indices_pk.reshape(R, T, K), probs_pk.reshape(R, T, K)
        else:
            kd_idx = np.zeros((S, T, K), dtype=np.int64)
            kd_p = np.zeros((S, T, K), dtype=np.float32)
            if fixed:
                kd_idx[seq, col] = indices_pk
                kd_p[seq, col] = probs_pk
            else:
                r_e, t_e = seq[ent_pos], col[ent_pos]
                kd_idx[r_e, t_e, slot] = indices
                kd_p[r_e, t_e, slot] = probs
        kd_tail = np.zeros((S, T), dtype=np.float32)
        kd_tail[seq, col] = tail
        kd_counts = np.zeros((S, T), dtype=np.int64)
        kd_counts[seq, col] = counts
        return self._token_batch(d.sample_id, d.window, ids, labels, mask, kd_mask, kd_idx, kd_p, kd_tail, kd_counts,
                                 lambda: (pos_row, pos_t, seq, col))

    def _token_batch(self, sample_id, window, ids, labels, mask, kd_mask, kd_idx, kd_p, kd_tail, kd_counts,
                     positions) -> dict[str, Any]:
        """The token-level batch dict (one implementation for both collation paths);
        ``positions()`` gives ``(pos_row, pos_t, seq, col)`` for packing's tensors."""
        out: dict[str, Any] = {
            "sample_id": sample_id, "window": torch.from_numpy(window),
            "input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "kd_indices": torch.from_numpy(kd_idx), "kd_probs": torch.from_numpy(kd_p), "kd_tail": torch.from_numpy(kd_tail),
            "kd_mask": torch.from_numpy(kd_mask), "kd_counts": torch.from_numpy(kd_counts),
        }
        if self.pack:
            pos_row, pos_t, seq, col = positions()
            out.update(_packing_tensors(seq, col, pos_row, pos_t, *mask.shape, mask))
        else:
            out["attention_mask"] = torch.from_numpy(mask)
        return out

    def _fused_batch(self, ids: np.ndarray, shard_of: np.ndarray, get_shard) -> dict[str, Any]:
        """:meth:`collate` of :meth:`_decode_rows` in one step (token level, no remap, native
        kernel): each shard's rows are decoded straight into the ``[S, T(, K)]`` arrays by one
        kernel call, with no flat intermediate and no per-position numpy work. Same tensors
        as the two-step path (``tests/test_native.py``)."""
        parts, files = self._batch_parts(ids, shard_of, get_shard)
        # Per row: first position, positions, context, window (one gather per shard).
        plans = [raw.row_plan().take(rows, axis=1) for raw, rows in parts]
        plan = plans[0] if len(plans) == 1 else np.concatenate(plans, axis=1)
        lengths = plan[1]
        if self._fixed_k:
            K = self._fixed_k if lengths.sum() else 1
        else:
            K = max(1, max((int(raw.row_max_counts()[rows].max(initial=0)) for raw, rows in parts), default=0))
        seq_of_row, start_of_row, S, T = self._row_layout(lengths)
        row_out = seq_of_row * T + start_of_row
        # Padded rows: each row's padding runs to the end of its sequence; packed: to the next row.
        row_pad = _row_padding(row_out, lengths, S * T) if self.pack else T - lengths
        # np.empty: the kernel writes every slot (rows, then row_pad positions of padding after
        # each), which saves zero-filling the batch first (0.5 ns per kept entry at k = 32).
        a = {"out_ids": np.empty((S, T), dtype=np.int64), "out_labels": np.empty((S, T), dtype=np.int64),
             "out_mask": np.empty((S, T), dtype=bool), "out_kd_mask": np.empty((S, T), dtype=bool),
             "out_idx": np.empty((S, T, K), dtype=np.int64), "out_probs": np.empty((S, T, K), dtype=np.float32),
             "out_tail": np.empty((S, T), dtype=np.float32), "out_counts": np.empty((S, T), dtype=np.int64)}
        # One kernel call for the batch's shards (a batch has rows, so parts); an error names
        # the shard at fault.
        self.store.row_decoder(parts[0][0], k_out=K, **a)(
            [(raw, raw.tokens if raw.tokens_are_ids else None, len(rows)) for raw, rows in parts],
            plan[0], plan[1], row_out, plan[2], None, row_pad, [f"{self.store.uri}/{f}" for f in files])
        sample_id = [x for raw, rows in parts for x in raw.sample_id[rows].tolist()]
        return self._token_batch(sample_id, plan[3], a["out_ids"], a["out_labels"], a["out_mask"], a["out_kd_mask"],
                                 a["out_idx"], a["out_probs"], a["out_tail"], a["out_counts"],
                                 lambda: self._position_layout(lengths)[:4])


def _row_padding(row_out: np.ndarray, lengths: np.ndarray, size: int) -> np.ndarray:
    """Padding positions after each row of a batch layout: rows ``r`` at flat positions
    ``row_out[r] : row_out[r] + lengths[r]`` of ``size``; the positions up to the next row's
    start (or the end) are row r's padding, so rows and paddings tile ``[0, size)``."""
    order = np.argsort(row_out, kind="stable")
    start = row_out[order]
    nxt = np.empty_like(start)
    nxt[:-1], nxt[-1:] = start[1:], size
    pad = np.empty(len(row_out), dtype=np.int64)
    pad[order] = nxt - (start + lengths[order])
    if len(start) and (start[0] != 0 or (pad < 0).any()):
        raise AssertionError("batch layout: rows overlap or leave a gap before the first row")  # a layout bug, not a user error
    return pad
