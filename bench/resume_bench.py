"""How much of a capture is redone after a kill at 50 %: shard time bound vs none.

One uninterrupted capture (``python -m pipelines.capture``, the reference teacher on People's
Daily lines) gives the teacher time T and the window count W. Then, side by side, two arms are
started, SIGKILLed when the teacher-token bar shows 50 %, and resumed with ``--resume --break-lock`` (the killed writer left its lease):

* ``no time bound``: ``--shard-seconds 1e9`` with the default ``--shard-bytes`` (128 MB),
  which is how the capture behaved before: a shard closes only at its size or at the end of
  the bundle, which in-process is the end of the run;
* ``--shard-seconds S``: shards also close every S seconds (S = a tenth of the teacher time
  here, standing in for the default 300 s on an hour-long capture).

Reported per arm: the teacher progress at the kill (the last percentage of the teacher-token
bar, which knows its total), the share of windows the resumed run kept, the share it computed
again although they had been computed before the kill ("redone" = progress - kept), and the
resumed run's wall time. Timings on a shared machine are noisy; the shares are what matter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._report import markdown_table, write_section  # noqa: E402


def _capture(args: list[str], *, log: Path, kill_at: float | None = None) -> tuple[float, float, float]:
    """Run a capture; returns ``(wall s, teacher s, teacher progress when it ended)``.
    ``kill_at``: SIGKILL once the teacher-token bar reaches this share."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    first_bar = None
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "pipelines.capture", *args], stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            while p.poll() is None:
                time.sleep(0.25)
                progress = _last_percent(log)
                if first_bar is None and "teacher tokens" in log.read_text(errors="replace"):
                    first_bar = time.perf_counter()
                if kill_at is not None and progress >= kill_at:
                    break
        finally:
            if p.poll() is None:  # the kill (or this benchmark was interrupted: leave no orphan)
                p.send_signal(signal.SIGKILL)
                p.wait()
    end = time.perf_counter()
    if kill_at is None and p.returncode != 0:
        raise RuntimeError(log.read_text()[-2000:])
    return end - t0, end - (first_bar or t0), _last_percent(log)


def _last_percent(log: Path) -> float:
    hits = re.findall(r"teacher tokens:\s+(\d+)%", log.read_text(errors="replace"))
    return float(hits[-1]) / 100 if hits else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=1200, help="People's Daily lines to capture")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: spin-waiting OpenMP threads stall on a busy machine)")
    ap.add_argument("--quick", action="store_true", help="small run; does not write docs/benchmarks.md")
    args = ap.parse_args(argv)
    from trainer.data.corpora import peoples_daily
    from trainer.lm.reference import reference_teacher

    teacher = reference_teacher(progress=False)
    lines = [s.text for s in peoples_daily("train")[: 300 if args.quick else args.lines]]
    work = Path(tempfile.mkdtemp(prefix="resume-bench-"))
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    base = ["--teacher", str(teacher), "--input", str(corpus), "--select", "top_p", "--p", "0.95", "--max-k", "32",
            "--threads", str(args.threads), "--direct_num_workers", "1", "--direct_running_mode", "in_memory"]
    base += ["--batch-tokens", "2048"]  # many teacher batches, so progress moves in small steps
    full_s, teacher_s, _ = _capture(base + ["--output", str(work / "full")], log=work / "full.log")
    windows = json.loads((work / "full" / "manifest.json").read_text())["totals"]["rows"]
    bound = max(1.0, round(teacher_s / 10, 1))
    rows = []
    for label, extra in (("no time bound (before)", ["--shard-seconds", "1e9"]), (f"--shard-seconds {bound:g}", ["--shard-seconds", str(bound)])):
        out = work / re.sub(r"\W+", "_", label)
        _, _, progress = _capture(base + ["--output", str(out), *extra], kill_at=0.5, log=work / "killed.log")
        res_s, res_teacher_s, _ = _capture(base + ["--output", str(out), "--resume", "--break-lock", *extra], log=work / "resume.log")
        kept = json.loads((out / "manifest.json").read_text())["totals"]["resumed_rows"] / windows
        rows.append([label, f"{progress:.0%}", f"{kept:.0%}", f"{max(0.0, progress - kept):.0%}", res_teacher_s,
                     res_teacher_s / teacher_s])
    headers = ["arm", "teacher progress at kill", "windows kept", "redone (progress - kept)", "resume teacher s",
               "resume / full teacher s"]
    table = markdown_table(headers, rows)
    print(f"full run: {full_s:.1f}s wall, {teacher_s:.1f}s with the teacher running, {windows} windows\n{table}")
    if not args.quick:
        body = (f"{len(lines)} People's Daily lines, reference teacher (`top_p` 0.95, max 32), in-process runner, "
                f"{args.threads} torch threads, `--batch-tokens 2048`; uninterrupted run {full_s:.1f} s wall of which "
                f"{teacher_s:.1f} s with the teacher running, {windows} windows. Each arm is SIGKILLed when the "
                f"teacher-token bar reaches 50 %, then resumed with `--resume --break-lock`; \"resume teacher s\" is "
                f"the resumed run's time from its first teacher batch to its end.\n\n{table}\n\n"
                f"Before, nothing was written until the end of the in-process bundle (here: the end of the run), so a "
                f"kill lost everything computed so far; with the time bound a kill loses at most the shard still open "
                f"(one bound's worth of work, plus the rows buffered for the row group). Wall times are noisy (shared "
                f"2-core machine); the shares are the measurement.")
        write_section("resume", "Resume after a kill at 50 %", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
