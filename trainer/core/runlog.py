"""The run log of every recipe: ``metrics.jsonl`` (one JSON object per event), PNG curves;
optionally the same records as TensorBoard scalars (``tensorboard=true``).

Every record has ``event`` (``train`` / ``eval``) and ``step``. When a run resumes from a
checkpoint at step ``s``, the records logged after ``s`` were undone by resuming and are
dropped, so the file always describes one straight run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def json_safe(x: Any) -> Any:
    """NaN/inf -> None, recursively (strict JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x


def median(xs: list[float]) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


class RunLog:
    """Append-only ``metrics.jsonl`` writer that keeps the records (``history``) for plots.

    Args:
        path: the JSONL file (created or truncated to the resumed run).
        resume_step: the step a run resumed at (records after it are dropped), or None.
        enabled: False on non-main ranks of a distributed run (nothing is written).
        tensorboard: also write every record as scalars to ``<path's folder>/tensorboard``.
    """

    def __init__(self, path: str | Path, *, resume_step: int | None = None, enabled: bool = True,
                 tensorboard: bool = False) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        kept: list[str] = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
                    self.history.append(rec)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
        self._tb = tensorboard_writer(self.path.parent, resume_step) if tensorboard else None

    def write(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Append one record (NaN/inf written as null); returns it as written."""
        rec = json_safe(rec)
        if self.enabled:
            self.history.append(rec)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if self._tb is not None:
                tensorboard_scalars(self._tb, rec)
        return rec

    def train(self, step: int, window: dict[str, list[float]], *, world: int) -> dict[str, Any]:
        """The LM loop's train record: window means, and tokens per second over all ranks."""
        rec: dict[str, Any] = {"event": "train", "step": step}
        for k in ("loss", "ce", "kd", "grad_norm", "lr", "step_s", "cpu_s", "data_s"):
            rec[k] = mean(window.get(k, []))
        rec["tokens_per_s"] = sum(window.get("tokens", [])) * world / max(sum(window.get("step_s", [])), 1e-9)
        self.write(rec)
        return rec

    def eval(self, step: int, ev: dict[str, Any], bar) -> None:
        """The LM loop's eval record (keys prefixed ``eval_``) and a one-line message."""
        if not self.enabled:
            return
        self.write({"event": "eval", "step": step, **{f"eval_{k}": v for k, v in ev.items()}})
        kl = f" KL({ev['kl_kind']}) {ev['kl']:.4f}" if math.isfinite(ev["kl"]) else ""  # no teacher signal: no KL
        msg = f"eval @ {step}: CE {ev['ce']:.4f} ppl {ev['ppl']:.2f}{kl} on {ev['tokens']} tokens"
        (bar.write if bar is not None else print)(msg)

    def plot(
        self,
        path: str | Path,
        *,
        train_keys: Sequence[str],
        eval_keys: Sequence[tuple[str, str]],
        train_ylabel: str = "nats",
        eval_ylabel: str = "",
        eval_filter: Callable[[dict[str, Any]], bool] | None = None,
        title: str = "",
    ) -> None:
        """Two panels: ``train_keys`` of the train records, and ``(key, label)`` of the eval
        records (those ``eval_filter`` keeps) against the step. Missing or NaN values are skipped."""
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        tr = [r for r in self.history if r.get("event") == "train"]
        ev = [r for r in self.history if r.get("event") == "eval" and (eval_filter is None or eval_filter(r))]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for key in train_keys:
            pts = _points(tr, key)
            if pts and any(v for _, v in pts):
                ax1.plot(*zip(*pts), label=f"train {key}")
        ax1.set(xlabel="step", ylabel=train_ylabel, title="training loss")
        ax1.legend()
        drawn = False
        for key, label in eval_keys:
            pts = _points(ev, key)
            if pts:
                ax2.plot(*zip(*pts), marker="o", label=label)
                drawn = True
        ax2.set(xlabel="step", ylabel=eval_ylabel, title="evaluation")
        if drawn:
            ax2.legend()
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _points(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def tensorboard_writer(out: Path, resume_step: int | None):
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``out/tensorboard``; after a resume at step
    ``s``, events logged after ``s`` are purged (as in ``metrics.jsonl``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
    except ImportError as exc:
        raise ValueError("tensorboard=true needs the tensorboard package: pip install 'kdstore[tensorboard]'") from exc
    return SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)


def tensorboard_scalars(writer, rec: dict[str, Any]) -> None:
    """Every finite number of a record as scalar ``<event>/<key>`` at ``rec["step"]``; flushed at once."""
    event, step = rec.get("event", "log"), int(rec.get("step", 0))
    for key, value in rec.items():
        if key not in ("event", "step") and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            writer.add_scalar(f"{event}/{key}", value, step)
    writer.flush()
