"""Teacher forward + sparse selection on the model's device (used by the Beam model handler
and by the plain-loop baseline, so both compute exactly the same thing).

Only small arrays leave the device: per window ``indices [E]``, ``probs [E]``,
``counts [P]`` and ``tail [P]``, never the ``[P, V]`` logits. Nor are those logits ever
whole on the device: a causal LM runs its decoder to hidden states ``[P, H]``, and the LM
head, softmax and selection run per chunk of positions (512 MiB of fp32 logits, see
:meth:`BatchSpec.rows_per_chunk`), so peak memory does not grow with the batch. At
V = 151,936 one 16k-token forward would otherwise hold 9.7 GB of fp32 logits
(``bench/scale_bench.py capture`` measures both).

Batching: a call gets any list of windows (a Beam batch under a token budget). Windows are
grouped by *padded length bucket* (their length rounded up to ``pad_multiple``), and each
group runs in micro-batches of at most ``micro_batch_tokens`` padded tokens. A window is
always padded to the same bucket, whatever else is in its batch: on CPU this makes its
logits bit-identical across runs and batch compositions (measured in
``tests/test_capture.py``), so two captures of the same corpus store identical codes.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from kdstore.format import Selection
from pipelines.teachers import TeacherModel, TeacherSpec

_LOG = logging.getLogger(__name__)


@dataclass
class SparseOutput:
    """Kept entries of one window (or one sample at sequence level).

    indices: ``[E]`` int32 teacher ids (class ids at sequence level), grouped by position.
    probs:   ``[E]`` float32 probabilities (``sample`` mode: counts / samples).
    counts:  ``[P]`` int32 kept entries per position.
    tail:    ``[P]`` float32 mass outside the kept entries.
    """

    indices: np.ndarray
    probs: np.ndarray
    counts: np.ndarray
    tail: np.ndarray


Output = Union[SparseOutput, str]  # a str is the reason a window failed (dead letter)


@dataclass(frozen=True)
class BatchSpec:
    """micro_batch_tokens: padded tokens per forward pass; pad_multiple: bucket width;
    select_rows: positions per selection chunk (bounds the fp32 ``[rows, V]`` logits and
    softmax), capped so that one chunk's fp32 logits stay under ``select_bytes``."""

    micro_batch_tokens: int = 4096
    pad_multiple: int = 32
    select_rows: int = 4096
    select_bytes: int = 512 << 20

    def rows_per_chunk(self, vocab: int) -> int:
        """Positions per selection chunk at vocabulary ``vocab``: 4096 at V = 4k, 882 at
        V = 151,936 (512 MiB of fp32 logits; larger chunks only add memory, smaller ones
        make the LM head matmul less efficient)."""
        return max(16, min(self.select_rows, self.select_bytes // (4 * max(1, vocab))))


def bucket_length(n: int, pad_multiple: int) -> int:
    return max(pad_multiple, -(-n // pad_multiple) * pad_multiple)


# Progress bars of the runners loaded in this process. A runner lives in Beam's shared-object
# cache past the end of the pipeline, so its bar would otherwise close (and print its last
# line) only at interpreter exit; the capture closes them when the pipeline is done.
_OPEN_BARS: "weakref.WeakSet" = weakref.WeakSet()


def close_progress_bars() -> None:
    """Close the progress bars of every teacher runner loaded in this process."""
    for bar in list(_OPEN_BARS):
        bar.close()
    _OPEN_BARS.clear()


class TeacherRunner:
    """A loaded teacher that turns token-id windows into sparse soft labels.

    One instance per model copy. ``infer`` is serialised by a lock: with ``large_model``
    all SDK processes call into one copy, and one forward at a time using all cores (CPU)
    or the whole device (GPU) is faster than interleaved ones. ``model``: an already
    loaded :class:`~pipelines.teachers.TeacherModel` (the plain loop's in-memory teacher)
    instead of loading ``teacher``.
    """

    def __init__(
        self,
        *,
        teacher: TeacherSpec,
        selection: Selection,
        batch: BatchSpec | None = None,
        pad_id: int = 0,
        progress: bool = False,
        model: TeacherModel | None = None,
        progress_total: int | None = None,
        progress_exact: bool = True,
    ) -> None:
        import torch  # noqa: PLC0415

        self.teacher = teacher
        self.selection = selection
        self.batch = batch or BatchSpec()
        self.pad_id = int(pad_id)
        self.model = model if model is not None else teacher.load_model()
        self.device = self.model.device
        self.level = teacher.level
        self._lock = threading.Lock()
        self._torch = torch
        # Sequence classifiers find the last real token via their pad id; without one they
        # cannot batch, so such models run one sample per forward.
        self._seq_can_batch = self.level != "sequence" or self.model.pad_id is not None
        if self.level == "sequence" and self._seq_can_batch:
            self.pad_id = int(self.model.pad_id)
        self.tokens_done = 0
        self.seconds = 0.0
        self.forward_seconds = 0.0
        self.select_seconds: list[float] = []
        self._progress = progress
        self._total = progress_total or None  # teacher positions of the whole run (a bar with % and ETA)
        self._exact = progress_exact
        self._bar = None

    # -- public ---------------------------------------------------------------------------
    def infer(self, ids: Sequence[np.ndarray], keys: Sequence[int]) -> list[Output]:
        """Sparse outputs for windows ``ids[i]`` (int token ids ``[T_i]``); ``keys[i]`` seeds
        sample-mode draws. Failures are returned as reason strings, not raised."""
        return self.infer_many(ids, keys, [self.selection])[0]

    def infer_many(self, ids: Sequence[np.ndarray], keys: Sequence[int], selections: Sequence[Selection]) -> list[list[Output]]:
        """:meth:`infer` for several selections from one forward pass: ``out[s][i]`` is
        window ``i`` under ``selections[s]`` (one teacher pass, several stores)."""
        with self._lock:
            t0 = time.perf_counter()
            if len(self.select_seconds) < len(selections):
                self.select_seconds += [0.0] * (len(selections) - len(self.select_seconds))
            out: list[list[Output | None]] = [[None] * len(ids) for _ in selections]
            lengths = np.array([len(x) for x in ids], dtype=np.int64)
            if self._seq_can_batch:
                buckets = np.array([bucket_length(int(n), self.batch.pad_multiple) for n in lengths])
                if self.model.max_positions:  # never pad past the model's positions (windows fit by construction)
                    buckets = np.maximum(np.minimum(buckets, self.model.max_positions), lengths)
            else:  # a classifier without pad_token_id reads the last position: never pad
                buckets = lengths.copy()
            # Deterministic grouping: by bucket, then by input order within the bucket.
            for b in np.unique(buckets):
                members = np.flatnonzero(buckets == b)
                per = max(1, self.batch.micro_batch_tokens // int(b)) if self._seq_can_batch else 1
                for j in range(0, len(members), per):
                    group = members[j : j + per].tolist()
                    self._run_group(group, ids, keys, int(b), out, selections)
            n_tok = int(lengths.sum())
            self.tokens_done += n_tok
            self.seconds += time.perf_counter() - t0
            if self._progress:
                if self._bar is None or self._bar.disable:  # first call, or closed after a pipeline
                    from tqdm import tqdm  # noqa: PLC0415

                    desc = "teacher tokens" + ("" if self._exact else " (est.)")
                    self._bar = tqdm(desc=desc, total=self._total, unit="tok", unit_scale=True, mininterval=2.0, smoothing=0.1)
                    _OPEN_BARS.add(self._bar)
                self._bar.update(n_tok)
            return out  # type: ignore[return-value]

    def stats(self) -> dict[str, float]:
        return {"tokens": self.tokens_done, "seconds": self.seconds}

    # -- private --------------------------------------------------------------------------
    def _run_group(self, group: list[int], ids, keys, padded: int, out: list, selections: Sequence[Selection]) -> None:
        try:
            results = self._forward_select([ids[i] for i in group], [keys[i] for i in group], padded, selections)
        except Exception as exc:  # noqa: BLE001 - model errors become dead letters, per window
            if len(group) == 1:
                for per_sel in out:
                    per_sel[group[0]] = f"model error: {type(exc).__name__}: {str(exc)[:300]}"
                return
            _LOG.warning("teacher forward failed for a micro-batch of %d windows (%s); retrying one by one", len(group), exc)
            for i in group:
                self._run_group([i], ids, keys, padded, out, selections)
            return
        for per_sel, res in zip(out, results):
            for i, r in zip(group, res):
                per_sel[i] = r

    def _forward_select(self, ids: list[np.ndarray], keys: list[int], padded: int,
                        selections: Sequence[Selection]) -> list[list[Output]]:
        torch = self._torch
        n = len(ids)
        lens = [len(x) for x in ids]
        x = np.full((n, padded), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, padded), dtype=np.int64)
        for r, a in enumerate(ids):
            x[r, : len(a)] = a
            mask[r, : len(a)] = 1
        with torch.inference_mode():
            t0 = time.perf_counter()
            xt = torch.from_numpy(x).to(self.device)
            mt = torch.from_numpy(mask).to(self.device)
            if self.level == "sequence":
                rows, head, positions = self.model.logits(xt, mt), None, [1] * n  # [n, C]
            else:
                # Hidden states [P, H] and the LM head when the teacher separates them (the head
                # then runs per chunk below), else the logits [P, V]; window by window.
                rows, head = self.model.position_rows(xt, mt)
                positions = lens
            self.forward_seconds += time.perf_counter() - t0
            return self._select_chunks(rows, head, positions, keys, selections)

    def _select_chunks(self, rows, head, positions: list[int], keys: list[int],
                       selections: Sequence[Selection]) -> list[list[Output]]:
        """Every selection of ``rows`` (logits ``[P, V]``, or hidden states ``[P, H]`` with
        ``head``), chunk by chunk: at most one chunk's ``[rows, V]`` logits exist at a time."""
        torch = self._torch
        from pipelines.selection import sample_uniforms, select  # noqa: PLC0415

        uniforms = [None if sel.mode != "sample" else
                    torch.from_numpy(sample_uniforms(list(keys), positions, sel.samples, sel.seed or 0)) for sel in selections]
        vocab = int(head.weight.shape[0]) if head is not None else int(rows.shape[-1])
        step = self.batch.rows_per_chunk(vocab)
        parts: list[list[tuple]] = [[] for _ in selections]
        finite_parts = []
        for r0 in range(0, rows.shape[0], step):
            t0 = time.perf_counter()
            chunk = rows[r0 : r0 + step] if head is None else head(rows[r0 : r0 + step])
            finite_parts.append(torch.isfinite(chunk).all(dim=-1).cpu().numpy())
            clean = torch.nan_to_num(chunk.float(), nan=0.0, posinf=0.0, neginf=0.0)
            self.forward_seconds += time.perf_counter() - t0
            for s, sel in enumerate(selections):
                t0 = time.perf_counter()
                u = None if uniforms[s] is None else uniforms[s][r0 : r0 + step].to(chunk.device)
                parts[s].append(select(clean, mode=sel.mode, k=sel.k, p=sel.p, max_k=sel.max_k, samples=sel.samples,
                                       temperature=sel.temperature, uniforms=u).flat())
                self.select_seconds[s] += time.perf_counter() - t0
            del chunk, clean
        finite = np.concatenate(finite_parts) if finite_parts else np.zeros(0, dtype=bool)
        return [_window_outputs(ps, positions, finite) for ps in parts]


def _window_outputs(parts: list[tuple], positions: list[int], finite: np.ndarray) -> list[Output]:
    """Flat selection chunks -> one output per window (a reason string where its logits
    were not finite)."""
    idx = np.concatenate([p[0] for p in parts]).astype(np.int32)
    probs = np.concatenate([p[1] for p in parts]).astype(np.float32)
    counts = np.concatenate([p[2] for p in parts]).astype(np.int32)
    tail = np.concatenate([p[3] for p in parts]).astype(np.float32)
    pos_off = np.concatenate([[0], np.cumsum(positions)])
    ent_off = np.concatenate([[0], np.cumsum(counts)])
    results: list[Output] = []
    for w in range(len(positions)):
        p0, p1 = pos_off[w], pos_off[w + 1]
        if not finite[p0:p1].all():
            results.append(f"model error: non-finite logits at {int((~finite[p0:p1]).sum())} position(s)")
            continue
        e0, e1 = ent_off[p0], ent_off[p1]
        results.append(SparseOutput(indices=idx[e0:e1], probs=probs[e0:e1], counts=counts[p0:p1], tail=tail[p0:p1]))
    return results
