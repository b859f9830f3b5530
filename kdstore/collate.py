"""Join a user's tokenized dataset to a store by ``sample_id``: :class:`StoreCollator`.

Hugging Face ``Trainer``/TRL users keep their own dataset (filtered, shuffled, mixed with
other data); each example carries the ``sample_id`` the capture gave its text
(:func:`kdstore.hashing.sample_id`, a content hash) and, for samples cut into several
windows, the ``window`` number. The collator pads the examples and looks up each one's
soft labels in the store by ``(sample_id, window)``, never by step or position, so the
targets cannot drift from the samples whatever the user does to the order.

Random access reads the Parquet row group (default 1,024 rows) of each row not in the cache,
and keeps recently used groups up to ``cache_bytes`` (undecoded codes: about 3 B per kept
entry). A store that fits the cache is read once; a fully shuffled pass over a store much
larger than the cache reads a row group for almost every row (``bench/collate_bench.py``:
~40x slower than streaming): fine for fine-tuning sets, wasteful for billions of tokens
(stream those in store order with :class:`kdstore.SoftLabelDataset`, or let
:class:`StoreOrderSampler` order the dataset so that it reads the store a block of row groups
at a time).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch
import xxhash
from tqdm.auto import tqdm

from kdstore.dataset import IGNORE_INDEX, SoftLabelDataset, TargetRemap
from kdstore.errors import CorruptShardError
from kdstore.rows import RawRows
from kdstore.store import TARGET_COLUMNS, Store, open as open_store

KD_KEYS = ("kd_indices", "kd_probs", "kd_tail", "kd_mask")


def _nbytes(raw: RawRows) -> int:
    return sum(a.nbytes for a in vars(raw).values() if isinstance(a, np.ndarray))


def _key(sample_id: str) -> int:
    return xxhash.xxh3_64_intdigest(sample_id.encode("utf-8"))


class StoreCollator:
    """Collate ``[{"sample_id", "input_ids", ...}]`` into a padded batch with the store's targets.

    Each example needs ``sample_id`` (str) and ``input_ids`` (the teacher tokenizer's ids of
    that store row: same tokens, same length); optional ``window`` (int, default 0),
    ``attention_mask`` and ``labels`` (Hugging Face convention: unshifted, ``-100`` ignored;
    default: a copy of ``input_ids``). Output (L = longest example, K = most kept entries):

    - ``input_ids`` ``[B, L]`` long (``pad_token_id`` in padding), ``attention_mask`` ``[B, L]``
      long, ``labels`` ``[B, L]`` long (``-100`` in padding)
    - ``kd_indices`` ``[B, L, K]`` long, ``kd_probs`` ``[B, L, K]`` float32 (0 in padding
      slots), ``kd_tail`` ``[B, L]`` float32, ``kd_mask`` ``[B, L]`` bool: aligned with
      ``input_ids`` position by position (position t holds the teacher's distribution of
      the token after token t, i.e. it goes with ``logits[:, t]``)
    - ``sample_id`` (list of B str)

    Sequence-level stores (classification) give ``kd_indices``/``kd_probs`` ``[B, K]``,
    ``kd_tail``/``kd_mask`` ``[B]`` and ``labels`` ``[B]`` (the example's ``labels``/``label``,
    else the store's label, -100 where neither has one); tokens are not checked (the store
    keeps none).

    Args:
        store: an opened store or its URI.
        pad_token_id: id written into padded ``input_ids``.
        padding_side: ``"right"`` or ``"left"``.
        remap: vocabulary remapping for a student with another vocabulary (:mod:`kdstore.align`).
        check_tokens: compare the example's ids with the store's tokens (catches a different
            tokenizer or text); a mismatch raises naming the sample and position.
        allow_prefix: accept an example that is a prefix of its store row (truncated to a
            shorter ``max_length``: a causal teacher's target at t depends only on tokens <= t).
        cache_bytes: memory for recently used row groups (LRU; at least the current batch's).
        pad_to_multiple_of: round L up to a multiple of this.
    """

    def __init__(
        self,
        store: Store | str,
        *,
        pad_token_id: int = 0,
        padding_side: str = "right",
        remap: TargetRemap | None = None,
        check_tokens: bool = True,
        allow_prefix: bool = False,
        cache_bytes: int = 1 << 30,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.store = open_store(store) if isinstance(store, str) else store
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.remap = remap
        self.check_tokens = check_tokens
        self.allow_prefix = allow_prefix
        self.cache_bytes = int(cache_bytes)
        self._cached_bytes = 0
        self.row_group_reads = 0  # cache misses so far (a diagnostic: ~ groups per pass is ideal)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.level = self.store.manifest.level
        # The dataset's collation turns decoded rows into padded tensors (one implementation).
        self._ds = SoftLabelDataset(self.store, batch_size=1, shuffle=False, rank=0, world_size=1, remap=remap)
        self._columns = list(TARGET_COLUMNS) + (["label"] if "label" in self.store.schema.names else [])
        self._cache: OrderedDict[tuple[int, int], RawRows] = OrderedDict()
        self._files: dict[int, Any] = {}
        self._build_index()

    # -- index: (sample_id, window) -> (shard, row group, row) -----------------------------
    def _build_index(self) -> None:
        keys, windows, shard, group, row = [], [], [], [], []
        shards = range(len(self.store.shards))
        for s in tqdm(shards, desc="store index", unit="shard", disable=len(shards) < 20, leave=False):
            pf = self._file(s)
            for g in range(pf.metadata.num_row_groups):
                t = pf.read_row_group(g, columns=["sample_id", "window"])
                n = t.num_rows
                keys.append(np.fromiter((_key(x) for x in t.column("sample_id").to_pylist()), dtype=np.uint64, count=n))
                windows.append(t.column("window").to_numpy().astype(np.int64))
                shard.append(np.full(n, s, dtype=np.int64))
                group.append(np.full(n, g, dtype=np.int64))
                row.append(np.arange(n, dtype=np.int64))
        cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dtype=dt)  # noqa: E731
        k, w = cat(keys, np.uint64), cat(windows, np.int64)
        order = np.lexsort((w, k))
        self._keys, self._windows = k[order], w[order]
        self._where = np.stack([cat(shard, np.int64), cat(group, np.int64), cat(row, np.int64)], 1)[order]

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started by spawn pickle the collator: open files and the cache stay behind.
        state = dict(self.__dict__)
        state.update(_files={}, _cache=OrderedDict(), _cached_bytes=0)
        return state

    def __len__(self) -> int:
        """Rows in the store (the number of ``(sample_id, window)`` pairs it can join)."""
        return len(self._keys)

    def __contains__(self, item: str | tuple[str, int]) -> bool:
        sid, w = (item, 0) if isinstance(item, str) else item
        return self._find(sid, int(w)) is not None

    def _find(self, sample_id: str, window: int) -> tuple[int, int, int] | None:
        k = np.uint64(_key(sample_id))
        lo, hi = np.searchsorted(self._keys, k, "left"), np.searchsorted(self._keys, k, "right")
        hit = lo + np.searchsorted(self._windows[lo:hi], window)
        if hit < hi and self._windows[hit] == window:
            return tuple(int(x) for x in self._where[hit])
        return None

    def _file(self, s: int):
        if s not in self._files:
            self._files[s] = self.store.open_shard(s)
        return self._files[s]

    def _group(self, s: int, g: int) -> RawRows:
        key = (s, g)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        source = f"/{self.store.shards[s].file}"
        try:
            table = self._file(s).read_row_group(g, columns=self.store._existing(self._columns))
        except (OSError, pa.ArrowInvalid) as exc:
            raise CorruptShardError(f"{self.store.uri}{source}: cannot decode row group {g} ({exc}); run 'kd store verify {self.store.uri}'") from exc
        raw = self.store.raw(table, source=source)
        if raw.tokens is not None:
            raw.tokens = self.store.token_ids(raw.tokens, where=source)
            raw.tokens_are_ids = True
        self._cache[key] = raw
        self.row_group_reads += 1
        self._cached_bytes += _nbytes(raw)
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            self._cached_bytes -= _nbytes(self._cache.popitem(last=False)[1])
        return raw

    # -- collation -------------------------------------------------------------------------
    def lookup(self, sample_ids: Sequence[str], windows: Sequence[int] | None = None) -> dict[str, Any]:
        """The store's own batch for these rows (:meth:`SoftLabelDataset.collate`), in this order."""
        windows = [0] * len(sample_ids) if windows is None else [int(w) for w in windows]
        parts = []
        held: dict[tuple[int, int], RawRows] = {}  # each row group once per batch, even past the cache size
        for i, (sid, w) in enumerate(zip(sample_ids, windows)):
            if not isinstance(sid, str):
                raise TypeError(f"example {i}: sample_id must be a str, got {type(sid).__name__}")
            hit = self._find(sid, w)
            if hit is None:
                raise KeyError(
                    f"sample_id {sid!r} window {w} is not in the store {self.store.uri} ({len(self)} rows): the example's "
                    "text differs from the captured one (sample_id = kdstore.hashing.sample_id(text)), or it was not "
                    "captured (see the store's dead letters: kd store inspect); filter such examples out first"
                )
            s, g, r = hit
            if (s, g) not in held:
                held[(s, g)] = self._group(s, g)
            parts.append((held[(s, g)], np.array([r])))
        raw = RawRows.gather(parts, fixed_k=self._ds._fixed_k)
        decoded = self.store.decode_raw(raw, source=" (collator lookup)")
        got = list(decoded.sample_id)
        if got != list(sample_ids):  # a 64-bit key collision between two ids: refuse, never mix targets
            bad = next(i for i, (a, b) in enumerate(zip(got, sample_ids)) if a != b)
            raise KeyError(f"sample_id {sample_ids[bad]!r} collides with {got[bad]!r} in the collator's index")
        return self._ds.collate(decoded)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("empty batch")
        missing = [i for i, f in enumerate(features) if "sample_id" not in f or "input_ids" not in f]
        if missing:
            raise KeyError(
                f"example(s) {missing[:5]} have no 'sample_id'/'input_ids': add the sample_id column to the dataset "
                "(and pass remove_unused_columns=False, or use trainer.hf.KDTrainer, which keeps it)"
            )
        sids = [f["sample_id"] for f in features]
        wins = [int(f.get("window", 0)) for f in features]
        batch = self._pad(features, token_labels=self.level == "token")
        target = self.lookup(sids, wins)
        if self.level == "sequence":
            # Class labels [B]: the example's own ("labels"/"label"), else the store's (-100 = none).
            own = [f.get("labels", f.get("label")) for f in features]
            labels = target["labels"].clone()
            for r, y in enumerate(own):
                if y is not None:
                    labels[r] = int(y)
            batch.pop("_lengths")
            batch.update(labels=labels, kd_indices=target["kd_indices"], kd_probs=target["kd_probs"],
                         kd_tail=target["kd_tail"], kd_mask=torch.ones(len(features), dtype=torch.bool))
        else:
            batch.update(self._align(batch, target, sids, wins))
        batch["sample_id"] = sids
        return batch

    def _pad(self, features: list[dict[str, Any]], *, token_labels: bool = True) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long).reshape(-1) for f in features]
        L = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            m = int(self.pad_to_multiple_of)
            L = (L + m - 1) // m * m
        B = len(ids)
        out_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        att = torch.zeros((B, L), dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        for r, (f, x) in enumerate(zip(features, ids)):
            sl = slice(0, len(x)) if self.padding_side == "right" else slice(L - len(x), L)
            out_ids[r, sl] = x
            att[r, sl] = torch.as_tensor(f["attention_mask"], dtype=torch.long).reshape(-1) if "attention_mask" in f else 1
            if token_labels:
                labels[r, sl] = torch.as_tensor(f["labels"], dtype=torch.long).reshape(-1) if "labels" in f else x
        out = {"input_ids": out_ids, "attention_mask": att, "_lengths": torch.tensor([len(x) for x in ids])}
        if token_labels:
            out["labels"] = labels
        return out

    def _align(self, batch: dict[str, torch.Tensor], target: dict[str, Any], sids: list[str], wins: list[int]) -> dict[str, torch.Tensor]:
        """Place the store's ``[B, T, K]`` targets at each example's positions in ``[B, L]``."""
        lengths = batch.pop("_lengths").tolist()
        B, L = batch["input_ids"].shape
        K = target["kd_indices"].shape[-1]
        store_len = target["attention_mask"].sum(1).tolist()
        out = {
            "kd_indices": torch.zeros((B, L, K), dtype=torch.long),
            "kd_probs": torch.zeros((B, L, K), dtype=torch.float32),
            "kd_tail": torch.zeros((B, L), dtype=torch.float32),
            "kd_mask": torch.zeros((B, L), dtype=torch.bool),
        }
        for r, (n, p) in enumerate(zip(lengths, store_len)):
            where = f"sample_id {sids[r]!r} window {wins[r]}"
            if n > p or (n < p and not self.allow_prefix):
                hint = " (it is a prefix: pass allow_prefix=True to train on the truncated part)" if n < p else ""
                raise ValueError(
                    f"{where}: {n} tokens in the dataset but {p} positions in the store {self.store.uri}{hint}; "
                    "tokenize with the store's teacher tokenizer and the capture's window length"
                )
            start = 0 if self.padding_side == "right" else L - n
            if self.check_tokens:
                mine, theirs = batch["input_ids"][r, start : start + n], target["input_ids"][r, :n]
                diff = (mine != theirs).nonzero()
                if len(diff):
                    t = int(diff[0])
                    raise ValueError(
                        f"{where}: token {t} is {int(mine[t])} in the dataset but {int(theirs[t])} in the store "
                        f"{self.store.uri}: the dataset was tokenized with another tokenizer (use the teacher's, "
                        f"{self.store.manifest.teacher.name_or_path!r}), or pass check_tokens=False if that is intended"
                    )
            sl = slice(start, start + n)
            out["kd_indices"][r, sl] = target["kd_indices"][r, :n]
            out["kd_probs"][r, sl] = target["kd_probs"][r, :n]
            out["kd_tail"][r, sl] = target["kd_tail"][r, :n]
            out["kd_mask"][r, sl] = target["kd_mask"][r, :n]
        return out


class StoreOrderSampler(torch.utils.data.Sampler):
    """A shuffled order of a dataset that reads the store one block of row groups at a time.

    Row groups are permuted, grouped ``block_groups`` at a time, and the dataset's examples of
    a block are permuted among themselves: every epoch is a different order, each example once,
    and a collator whose cache holds one block (about ``block_groups`` row groups) reads each
    row group once per epoch instead of about once per example. The order is a pure function
    of ``(seed, epoch)`` (``set_epoch``, called by the Hugging Face Trainer).

    Args:
        collator: the :class:`StoreCollator` that will collate the batches.
        sample_ids, windows: the dataset's join keys, in dataset order (windows default 0).
    """

    def __init__(self, collator: StoreCollator, sample_ids: Sequence[str], windows: Sequence[int] | None = None, *,
                 seed: int = 0, block_groups: int = 8) -> None:
        windows = [0] * len(sample_ids) if windows is None else list(windows)
        if len(windows) != len(sample_ids):
            raise ValueError(f"{len(sample_ids)} sample_ids but {len(windows)} windows")
        group = np.zeros(len(sample_ids), dtype=np.int64)
        ids: dict[tuple[int, int], int] = {}
        for i, (sid, w) in enumerate(zip(sample_ids, windows)):
            hit = collator._find(sid, int(w))
            if hit is None:
                raise KeyError(f"example {i}: sample_id {sid!r} window {int(w)} is not in the store {collator.store.uri}")
            group[i] = ids.setdefault(hit[:2], len(ids))
        self.group, self.n_groups = group, len(ids)
        self.seed, self.block_groups, self.epoch = seed, max(1, int(block_groups)), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.group)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        rank = np.empty(self.n_groups, dtype=np.int64)
        rank[rng.permutation(self.n_groups)] = np.arange(self.n_groups)
        block = rank[self.group] // self.block_groups
        order = np.lexsort((rng.random(len(block)), block))  # blocks in order, examples shuffled within
        return iter(order.tolist())


def store_collator(store: Store | str, tokenizer: Any = None, **kw: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """:class:`StoreCollator` with ``pad_token_id``/``padding_side`` taken from a HF tokenizer."""
    if tokenizer is not None:
        kw.setdefault("pad_token_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        kw.setdefault("padding_side", getattr(tokenizer, "padding_side", "right") or "right")
    return StoreCollator(store, **kw)
