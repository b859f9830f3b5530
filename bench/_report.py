"""Shared helper for benchmarks: each benchmark owns one section of docs/benchmarks.md.

A section is delimited by ``<!-- bench:NAME -->`` / ``<!-- /bench:NAME -->`` markers so
that benchmarks written by different modules can be re-run independently without
clobbering each other.
"""

from __future__ import annotations

import datetime as _dt
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


def paired_ratio(base: list[float], other: list[float]) -> str:
    """``"median (min-max)"`` of ``base[i] / other[i]`` over repeats i (times of a baseline and
    a reader measured back to back in each repeat): a host that slows down for a while slows
    both, so the ratios' spread is the run's own noise, shown next to any target."""
    r = sorted(b / o for b, o in zip(base, other))
    return f"{statistics.median(r):.2f}x ({r[0]:.2f}-{r[-1]:.2f})"


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
