"""Checkpoints: everything needed to continue a run exactly, as plain tensors and types.

A checkpoint is ``torch.save`` of a dict holding the model, optimizer and scheduler
state dicts, the data-loader state and RNG states of every rank, the step, and the flat
config. It contains only tensors, numbers, strings, lists, tuples and dicts, so it loads
with ``torch.load(weights_only=True)`` (no arbitrary code runs when a checkpoint is
opened). Files are written to a temporary name and renamed, so a crash mid-write never
leaves a truncated ``ckpt-*.pt`` behind.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "kdstore.trainer.checkpoint.v1"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU and CUDA) as weights_only-safe values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"ckpt-{step:07d}.pt"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoints of a run directory, oldest first."""
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(path: str | Path) -> Path:
    """A checkpoint file, or the latest checkpoint of a run directory."""
    p = Path(path)
    if p.is_file():
        return p
    found = list_checkpoints(p)
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoint file and no checkpoints/ckpt-*.pt in it; nothing to resume")
    return found[-1]


def save_checkpoint(path: str | Path, payload: dict[str, Any], *, keep: int = 0) -> Path:
    """Write ``payload`` atomically; with ``keep > 0`` delete older checkpoints beyond it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)
    if keep > 0:
        for old in list_checkpoints(path.parent.parent)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; errors say what is wrong."""
    p = resolve_resume(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for bad files
        raise ValueError(f"{p}: cannot load checkpoint ({exc}); it is truncated or not a kdstore trainer checkpoint") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{p}: not a {FORMAT} checkpoint")
    ckpt["path"] = str(p)
    return ckpt
