"""Driver-side survey of the input: the teacher-token total for the capture's progress bar
(so it shows a percentage and ETA) and the input token counts behind the index order.

The driver counts the positions the teacher will run: every input record is tokenized and
windowed exactly as the pipeline does (same reader, de-duplication and windowing), minus
the positions already stored by a resumed run. Tokenizing is cheap next to the teacher
(a fast tokenizer does tens of MB/s), but on a large corpus the count stops after
``budget_bytes`` of input and extrapolates by file size: the bar then says "(est.)".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kdstore.textio import CorpusError, ReaderSpec, Record, iter_file
from pipelines.windows import WindowSpec, window_starts

_LOG = logging.getLogger(__name__)
BUDGET_BYTES = 64 << 20


def window_tokens(n: int, spec: WindowSpec) -> int:
    """Positions the teacher runs for a sample of ``n`` tokens (overlaps counted again)."""
    L = spec.max_length
    if n == 0 or (n > L and spec.overflow == "error"):
        return 0
    if spec.overflow == "truncate":
        return min(n, L)
    return sum(min(s + L, n) - s for s in window_starts(n, L, spec.step))


@dataclass
class InputSurvey:
    """What one driver-side pass over the input found (:func:`survey_input`).

    ``tokens``: teacher positions the capture runs (extrapolated by file size when not
    ``exact``); ``id_counts``: ``[tokenizer vocab]`` occurrences of each input token id over
    the surveyed text (None when not asked for); ``counted_tokens`` / ``counted_chars``: how
    much text (tokens, characters) they come from.
    """

    tokens: int
    exact: bool
    id_counts: np.ndarray | None = None
    counted_tokens: int = 0
    counted_chars: int = 0


def add_id_counts(acc: np.ndarray, ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, int]:
    """``(acc + occurrences of every id in ids, tokens added)``; ``acc`` (int64 per id) grows
    to the largest id seen."""
    flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]) if len(ids) else np.zeros(0, np.int64)
    c = np.bincount(flat, minlength=len(acc)).astype(np.int64)
    c[: len(acc)] += acc
    return c, len(flat)


def survey_input(files: Sequence[str], *, reader: ReaderSpec, encoder, spec: WindowSpec, dedupe: bool,
                 count_ids: bool = False, budget_bytes: int = BUDGET_BYTES) -> InputSurvey:
    """One pass over (the first ``budget_bytes`` of) the input, tokenized as the workers do.

    ``encoder``: the teacher's text encoder (``EncoderSpec.load()``). ``count_ids``: also
    count input token ids, from which the ``rank_delta`` index order is made (frequent ids
    first; :func:`kdstore.encode.frequency_order`). The survey is a pure function of the
    input files, so a resumed run finds the same order.
    """
    from kdstore.fs import resolve  # noqa: PLC0415

    sizes = []
    for f in files:
        loc = resolve(f)
        sizes.append(max(0, loc.fs.get_file_info(loc.root).size or 0))
    seen: set[str] = set()
    out = InputSurvey(tokens=0, exact=True)
    counts = np.zeros(0, dtype=np.int64)
    read_bytes = done_size = 0
    buf: list[str] = []

    def flush() -> int:
        nonlocal counts
        ids, _ = encoder.encode(buf, offsets=False)
        buf.clear()
        if count_ids:
            counts, n = add_id_counts(counts, ids)
            out.counted_tokens += n
        return sum(window_tokens(len(x), spec) for x in ids)

    for f, size in zip(files, sizes):
        if read_bytes > budget_bytes:
            break
        try:
            for item in iter_file(f, reader):
                if not isinstance(item, Record) or (dedupe and item.sample_id in seen):
                    continue
                seen.add(item.sample_id)
                buf.append(item.text)
                read_bytes += len(item.text)
                if len(buf) >= 1024:
                    out.tokens += flush()
        except CorpusError:
            # The pipeline reports the file; the bar has no total, the order uses what was read.
            buf.clear()
            out.tokens, out.exact = 0, False
            break
        out.tokens += flush() if buf else 0
        done_size += size
    if out.exact:
        out.exact = done_size == sum(sizes)
        if not out.exact and done_size:
            out.tokens = int(out.tokens * sum(sizes) / done_size)
    if count_ids:
        out.id_counts = counts
        out.counted_chars = read_bytes  # characters: len() of the decoded text
    return out

