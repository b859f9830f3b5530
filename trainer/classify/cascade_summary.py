"""The summary of a cascade run directory: stage sizes and metrics from its step records, and
the fixed-width table ``kd train cascade`` prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def summarize(run_dir: str | Path, *, c_out: str = "c") -> dict[str, Any]:
    """Stage sizes and metrics from the step records of a run directory."""
    root = Path(run_dir)

    def rec(step: str) -> dict:
        p = root / f"{step}.step.json"
        return json.loads(p.read_text(encoding="utf-8"))["metrics"] if p.exists() else {}

    s: dict[str, Any] = {"run_dir": str(root), "data": rec("data"), "a": rec("a/model"), "a_store": rec("a/store"),
                         "split": rec("a/split"), "b": rec("b/model"), "b_store": rec("b/store"), "c": rec(f"{c_out}/model")}
    a, c = s["a"], s["c"]
    if a.get("parameters") and c.get("parameters"):
        s["c_vs_a"] = {"parameter_ratio": c["parameters"] / a["parameters"],
                       "throughput_ratio": c["test_samples_per_s"] / max(a["test_samples_per_s"], 1e-9),
                       "test_acc_delta": c["test"]["acc"] - a["test"]["acc"]}
    return s


def format_summary(s: dict[str, Any]) -> str:
    """The summary as a fixed-width text table (printed by the CLI)."""
    head = f"{'stage':<6}{'model':<13}{'params':>10}{'train n':>9}{'steps':>7}{'val acc':>9}{'test acc':>9}{'test F1':>9}{'samples/s':>11}"
    lines = [head, "-" * len(head)]
    for name in ("a", "b", "c"):
        m = s.get(name) or {}
        if not m or "arch" not in m:
            note = m.get("skipped", "not run") if m else "not run"
            lines.append(f"{name:<6}{note}")
            continue
        lines.append(f"{name:<6}{m['arch']:<13}{m['parameters']:>10,}{m['train_samples']:>9}{m['steps']:>7}"
                     f"{m['validation']['acc']:>9.4f}{m['test']['acc']:>9.4f}{m['test']['macro_f1']:>9.4f}{m['test_samples_per_s']:>11,.0f}")
    dm = s.get("data") or {}
    if dm:
        lines.append(f"data: {dm['train_used']} training samples ({dm['train_duplicates_merged']} duplicates merged, "
                     f"{dm['train_rejected_conflicting']} with conflicting labels left out, {dm['train_left_out_by_limit']} "
                     f"beyond train_limit), {dm['validation']} validation, {dm['test']} test")
    sp = s.get("split") or {}
    if sp:
        lines.append(f"split: {sp['samples']} samples, {sp['target']} target / {sp['substandard']} substandard "
                     f"({sp['substandard_share']:.1%}) at {sp['metric']} >= {sp['threshold']:g}")
    bs = s.get("b_store") or {}
    if "teacher_accuracy" in bs:
        lines.append(f"B's optimized labels on the substandard samples: argmax = gold on {bs['teacher_accuracy']:.1%}, "
                     f"mean p(gold) {bs['mean_gold_prob']:.3f}")
    if s.get("c_vs_a"):
        r = s["c_vs_a"]
        lines.append(f"C vs A: {r['parameter_ratio']:.3f}x parameters, {r['throughput_ratio']:.1f}x throughput, "
                     f"test accuracy {r['test_acc_delta']:+.4f}")
    return "\n".join(lines)
