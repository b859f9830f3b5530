"""Run logs: JSONL metrics (one object per train/eval event), sample audit files, PNG curves;
optionally the same records as TensorBoard scalars (``tensorboard=true``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trainer.core.config import TrainConfig
from trainer.core.runtime import Dist


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
    """``out/metrics.jsonl``: one JSON object per event. ``cfg`` is the run's flat config
    (:class:`TrainConfig` or another recipe's); only ``record_samples`` and ``tensorboard`` are read
    from it (absent = off)."""

    def __init__(self, out: Path, dist: Dist, cfg: TrainConfig | Any, *, resume_step: int | None) -> None:
        self.out, self.dist, self.cfg = out, dist, cfg
        self.path = out / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        if dist.is_main:
            kept: list[str] = []
            if resume_step is not None and self.path.exists():
                # Events logged after the checkpoint were undone by resuming: drop them.
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    rec = json.loads(line)
                    if rec.get("step", 0) <= resume_step:
                        kept.append(line)
                        self.history.append(rec)
            self.path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
        self._tb = tensorboard_writer(out, resume_step) if dist.is_main and getattr(cfg, "tensorboard", False) else None
        self._samples = None
        if getattr(cfg, "record_samples", False):
            mode = "a" if resume_step is not None else "w"
            self._samples = open(out / f"samples-rank{dist.rank}.txt", mode, encoding="utf-8")  # noqa: SIM115

    def write(self, rec: dict[str, Any]) -> None:
        """Append one event (rank 0 only; NaN/inf become null)."""
        if self.dist.is_main:
            self._write(rec)

    def _write(self, rec: dict[str, Any]) -> None:
        # NaN (e.g. the KD term of a CE-only run) is not JSON: write null.
        rec = json_safe(rec)
        self.history.append(rec)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if self._tb is not None:
            tensorboard_scalars(self._tb, rec)

    def train(self, step: int, window: dict[str, list[float]], *, world: int) -> dict[str, Any]:
        rec: dict[str, Any] = {"event": "train", "step": step}
        for k in ("loss", "ce", "kd", "grad_norm", "lr", "step_s", "cpu_s", "data_s"):
            rec[k] = mean(window.get(k, []))
        rec["tokens_per_s"] = sum(window.get("tokens", [])) * world / max(sum(window.get("step_s", [])), 1e-9)
        if self.dist.is_main:
            self._write(rec)
        return rec

    def eval(self, step: int, ev: dict[str, Any], bar) -> None:
        if not self.dist.is_main:
            return
        rec = {"event": "eval", "step": step, **{f"eval_{k}": v for k, v in ev.items()}}
        self._write(rec)
        msg = f"eval @ {step}: CE {ev['ce']:.4f} ppl {ev['ppl']:.2f} KL({ev['kl_kind']}) {ev['kl']:.4f} on {ev['tokens']} tokens"
        (bar.write if bar is not None else print)(msg)

    def samples(self, step: int, batch: dict[str, Any]) -> None:
        """One line per micro-batch: step, then ``sample_id:window`` of every row."""
        ids = batch["sample_id"]
        if "window" in batch:
            ids = [f"{s}:{int(w)}" for s, w in zip(ids, batch["window"])]
        self._samples.write(f"{step + 1}\t{' '.join(ids)}\n")
        self._samples.flush()

    def plot(self, path: Path) -> None:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        tr = [r for r in self.history if r["event"] == "train"]
        ev = [r for r in self.history if r["event"] == "eval"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for key in ("loss", "ce", "kd"):
            pts = [(r["step"], r[key]) for r in tr if r.get(key) is not None and math.isfinite(r[key])]
            if pts:
                axes[0].plot(*zip(*pts), label=f"train {key}")
        axes[0].set(xlabel="step", ylabel="nats / token", title="training loss")
        axes[0].legend()
        for key, label in (("eval_ce", "held-out CE"), ("eval_kl", "held-out KL to teacher")):
            pts = [(r["step"], r[key]) for r in ev if r.get(key) is not None and math.isfinite(r[key])]
            if pts:
                axes[1].plot(*zip(*pts), marker="o", label=label)
        axes[1].set(xlabel="step", ylabel="nats / token", title="evaluation")
        if ev:
            axes[1].legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


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
