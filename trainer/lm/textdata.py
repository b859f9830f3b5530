"""Text -> token windows -> batches, for CE training, evaluation and the online teacher.

Texts are tokenized with a Hugging Face tokenizer (its template adds BOS where it has one)
and end with EOS. :func:`packed_windows` concatenates documents into one stream and cuts
windows of ``seq_len + 1`` tokens that overlap by one token, so every token is a target
exactly once (training). :func:`document_windows` keeps documents apart (each document is
cut into such windows on its own), which matches how the capture pipeline sees samples
(evaluation). :class:`TextBatches` batches windows into the same dict layout as the
store's dataset (``input_ids``, ``attention_mask``, ``labels`` already shifted) with the
same deterministic order, rank sharding and resume state as :class:`kdstore.StoreLoader`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import xxhash

from kdstore.textio import DeadLetter, ReaderSpec, iter_file, keep_or_raise

IGNORE_INDEX = -100


def load_texts(source: str) -> list[str]:
    """Texts of a source: ``peoples_daily:<split>``, ``sentiment:<split>`` (splits train,
    validation, test, all), or a user file read by :mod:`kdstore.textio`: ``.txt`` (one
    document per non-empty line), ``.jsonl`` (a ``text`` field per line) or ``.parquet`` (a
    ``text`` column). A bad line raises ``path:N: reason``; blank lines are skipped."""
    name, sep, split = source.partition(":")
    if sep and name in ("peoples_daily", "sentiment"):
        from trainer.data import corpora  # noqa: PLC0415

        return [r.text for r in getattr(corpora, name)(split or "train")]
    path = Path(source)
    if not path.is_file():
        raise ValueError(
            f"text source {source!r}: not a file and not one of peoples_daily:<split>, sentiment:<split>"
        )
    out: list[str] = []
    blank: list[DeadLetter] = []
    for item in iter_file(str(path)):
        if isinstance(item, DeadLetter):
            keep_or_raise(item, blank, on_error="raise", hint="expected a JSON object with a 'text' field per line"
                          if ReaderSpec().format_of(str(path)) == "jsonl" else "")
            continue
        out.append(item.text)
    if not out:
        raise ValueError(f"{path}: no non-empty documents")
    return out


def texts_hash(texts: Sequence[str]) -> str:
    """xxh3-64 over the texts (order-sensitive): a data key for caches."""
    h = xxhash.xxh3_64()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def encode_texts(tokenizer: Any, texts: Sequence[str], *, batch: int = 2048) -> list[np.ndarray]:
    """Token ids ``[n_i]`` int64 of each text (tokenizer template, then EOS)."""
    eos = tokenizer.eos_token_id
    out: list[np.ndarray] = []
    for s in range(0, len(texts), batch):
        enc = tokenizer(list(texts[s : s + batch]), add_special_tokens=True)["input_ids"]
        for ids in enc:
            out.append(np.asarray(list(ids) + ([eos] if eos is not None else []), dtype=np.int64))
    return out


def packed_windows(docs: Sequence[np.ndarray], seq_len: int) -> list[np.ndarray]:
    """Windows ``[seq_len + 1]`` of the concatenated documents (the tail shorter than a
    full window is dropped); window i covers targets ``i*seq_len+1 .. (i+1)*seq_len``."""
    stream = np.concatenate(list(docs)) if len(docs) else np.zeros(0, np.int64)
    n = (len(stream) - 1) // seq_len
    return [stream[i * seq_len : (i + 1) * seq_len + 1] for i in range(max(n, 0))]


def document_windows(docs: Sequence[np.ndarray], seq_len: int) -> list[np.ndarray]:
    """Each document on its own, cut into windows of at most ``seq_len + 1`` tokens that
    overlap by one token (documents of one token have no target and are skipped)."""
    out = []
    for d in docs:
        for s in range(0, max(len(d) - 1, 0), seq_len):
            out.append(d[s : s + seq_len + 1])
    return out


def collate_windows(windows: Sequence[np.ndarray], *, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Windows of ``n_i + 1`` tokens -> ``input_ids [B, T]`` (pad ``pad_id``),
    ``attention_mask [B, T]`` bool, ``labels [B, T]`` (next token, -100 in padding)."""
    B = len(windows)
    T = max((len(w) - 1 for w in windows), default=0)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((B, T), dtype=bool)
    for i, w in enumerate(windows):
        n = len(w) - 1
        ids[i, :n] = w[:-1]
        labels[i, :n] = w[1:]
        mask[i, :n] = True
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask), "labels": torch.from_numpy(labels)}


class TextBatches:
    """Batches of token windows with a deterministic, resumable, rank-sharded order.

    The order of epoch e is ``permutation(seed, e)`` of the windows (or file order when
    ``shuffle`` is false); rank r takes every ``world_size``-th window. Iterating runs the
    rest of the current epoch; ``state_dict()`` / ``load_state_dict()`` resume exactly.
    Batches also carry ``sample_id`` (``"w<window index>"``) and ``batch_index``.
    """

    def __init__(
        self,
        windows: Sequence[np.ndarray],
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        pad_id: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if not len(windows):
            raise ValueError("no token windows: the text source is empty or shorter than one window")
        self.windows = list(windows)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size, self.drop_last, self.pad_id = rank, world_size, drop_last, pad_id
        self.epoch = 0
        self.batches_done = 0
        lengths = np.fromiter((len(w) for w in self.windows), dtype=np.int64)
        self._fingerprint = xxhash.xxh3_64_hexdigest(
            lengths.tobytes() + f"|{seed}|{shuffle}|{world_size}|{batch_size}|{drop_last}".encode()
        )

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def rank_rows(self, epoch: int | None = None) -> np.ndarray:
        e = self.epoch if epoch is None else epoch
        n = len(self.windows)
        order = np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle else np.arange(n)
        return order[self.rank :: self.world_size]

    def num_batches(self, epoch: int | None = None) -> int:
        n = len(self.rank_rows(epoch))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches() - self.batches_done

    @property
    def num_tokens(self) -> int:
        """Target tokens in all windows (all ranks)."""
        return sum(len(w) - 1 for w in self.windows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows = self.rank_rows()
        for j in range(self.batches_done, self.num_batches()):
            ids = rows[j * self.batch_size : (j + 1) * self.batch_size]
            batch: dict[str, Any] = collate_windows([self.windows[i] for i in ids], pad_id=self.pad_id)
            batch["sample_id"] = [f"w{i}" for i in ids]
            batch["batch_index"] = j
            self.batches_done += 1
            yield batch
        self.epoch += 1
        self.batches_done = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                "text data-loader state was saved for different data or settings (text, seq_len, seed, batch size, "
                "world size); resume with the same settings or start a fresh run"
            )
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
