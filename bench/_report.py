"""Shared helper for benchmarks: each benchmark owns one section of docs/benchmarks.md.

A section is delimited by ``<!-- bench:NAME -->`` / ``<!-- /bench:NAME -->`` markers so
that benchmarks written by different modules can be re-run independently without
clobbering each other.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
import re
import shlex
import statistics
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEach section is written by the benchmark named in it; re-run the command to refresh it.\n"


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
                return f"{v:.3g}"
            return f"{v:.4g}" if abs(v) < 100 else f"{v:,.1f}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def median_ci(values: list[float], *, level: float = 0.95) -> tuple[float, float, float]:
    """``(median, low, high)``: the sample median of ``values`` and a distribution-free
    confidence interval for the population median at ``level`` (order statistics: the
    number of values below the median is Binomial(n, 1/2), so ``[x_(j), x_(n+1-j)]`` covers it
    with probability ``1 - 2 P(B < j)``; the largest such j with coverage >= ``level``). No
    resampling, so the same values always give the same interval. With fewer than 6 values no
    interval reaches 95 %: the min-max is returned."""
    x = sorted(values)
    n = len(x)
    if n == 0:
        raise ValueError("median_ci needs at least one value")
    below, j = 0.0, 0  # below = P(B < j+1) as j grows
    while j + 1 <= n // 2:
        below_next = below + math.comb(n, j) / 2**n
        if 1 - 2 * below_next < level:
            break
        below, j = below_next, j + 1
    lo, hi = (x[j - 1], x[n - j]) if j >= 1 else (x[0], x[-1])
    return statistics.median(x), lo, hi


def paired_ratio(base: list[float], other: list[float]) -> str:
    """``"median [95 % CI] (min-max)"`` of ``base[i] / other[i]`` over repeats i (times of a
    baseline and a reader measured back to back in each repeat): a host that slows down for a
    while slows both, so the ratios' spread is the run's own noise, shown next to any target;
    the interval (:func:`median_ci`) says whether the median clears a target or noise could
    explain it."""
    r = [b / o for b, o in zip(base, other)]
    med, lo, hi = median_ci(r)
    return f"{med:.2f}x [{lo:.2f}-{hi:.2f}] ({min(r):.2f}-{max(r):.2f})"


def write_section(name: str, title: str, body: str, *, command: str | None = None, doc: Path = DOC) -> None:
    """Replace (or append) the section ``name`` of docs/benchmarks.md."""
    command = command or "python " + " ".join(shlex.quote(a) for a in sys.argv)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"Command: `{command}`  \nMachine: {machine()}; run {stamp}.\n\n{body.strip()}\n"
        f"<!-- /bench:{name} -->"
    )
    text = doc.read_text(encoding="utf-8") if doc.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text, encoding="utf-8")
