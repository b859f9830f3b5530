"""The teacher-token total for the capture's progress bar (so it shows a percentage and ETA).

The driver counts the positions the teacher will run: every input record is tokenized and
windowed exactly as the pipeline does (same reader, de-duplication and windowing), minus
the positions already stored by a resumed run. Tokenizing is cheap next to the teacher
(a fast tokenizer does tens of MB/s), but on a large corpus the count stops after
``budget_bytes`` of input and extrapolates by file size: the bar then says "(est.)".
"""

from __future__ import annotations

import logging
from typing import Sequence

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


def token_total(files: Sequence[str], *, reader: ReaderSpec, encoder, spec: WindowSpec, dedupe: bool,
                stored_tokens: int = 0, budget_bytes: int = BUDGET_BYTES) -> tuple[int, bool]:
    """``(positions still to run, exact)``; ``exact`` is False when extrapolated.
    ``encoder``: the teacher's text encoder (``EncoderSpec.load()``, as the workers use)."""
    from kdstore.fs import resolve  # noqa: PLC0415

    sizes = []
    for f in files:
        loc = resolve(f)
        sizes.append(max(0, loc.fs.get_file_info(loc.root).size or 0))
    seen: set[str] = set()
    total = read_bytes = 0
    done_size = 0
    buf: list[str] = []

    def flush() -> int:
        ids, _ = encoder.encode(buf, offsets=False)
        buf.clear()
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
                    total += flush()
        except CorpusError:
            return 0, False  # the pipeline reports the file; the bar just has no total
        total += flush() if buf else 0
        done_size += size
    exact = done_size == sum(sizes)
    if not exact and done_size:
        total = int(total * sum(sizes) / done_size)
    return max(0, total - stored_tokens), exact
