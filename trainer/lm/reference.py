"""The reference teacher: a small causal LM trained on People's Daily, cached by content.

``reference_teacher(cache_dir=...)`` returns a standard Hugging Face model directory
(weights, config, tokenizer) of a :mod:`trainer.lm.models` preset trained with the project's
own loop (:func:`trainer.lm.student.train`, CE only) on the People's Daily train split. The
directory is keyed by everything that determines it (recipe, model spec, tokenizer
identity, training-text hash, a recipe version), so later runs reuse it and any change
trains a new one. ``reference_student_baseline`` trains a model of about 1/4 the
teacher's parameters the same way, for the "teacher clearly beats a small student" check.

Recipes: ``cpu`` (teacher-small; sized to train in minutes on 2 CPU cores) and ``gpu``
(teacher-base, longer context, more steps, bf16; for a GPU when one is available).
Each directory holds ``reference.json`` with held-out perplexity, parameters and time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

RECIPE_VERSION = 2
TOKENIZER_VOCAB = 4000
# Threads of a CPU recipe's build (the shipped teacher was built with 2; see recipe_train_config).
BUILD_THREADS = 2


@dataclass(frozen=True)
class Recipe:
    """How a reference LM is trained (every field is part of the cache key)."""

    name: str
    model: str
    max_steps: int
    # Small batches: this is a data-limited regime (one or two epochs), where more updates per
    # token learn faster: after ~0.6M tokens, student-tiny reached train CE 6.66 / 6.78 / 6.95
    # with batch 8 / 16 / 32 (measured); 16 keeps two threads busy.
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    # Embedding rows learn only when their token occurs; in a short run they are the
    # bottleneck: x30 took student-tiny from train CE 6.80 to 5.88 after 280 steps (measured).
    lr_embed_mult: float = 30.0
    warmup_steps: int = 60
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    precision: str = "auto"  # bf16 where the hardware has it natively (the key holds the resolved value)
    device: str = "cpu"
    tokenizer_vocab: int = TOKENIZER_VOCAB
    train_text: str = "peoples_daily:train"
    eval_text: str = "peoples_daily:validation"
    seed: int = 0


RECIPES: dict[str, Recipe] = {
    # ~4.2M parameters, about two epochs (1200 x 16 x 128 tokens; 637 steps per epoch): ~7.5
    # minutes on 2 idle CPU cores. Measured: one epoch (600 steps) gave held-out perplexity
    # 193.5 against the 1/4-size student's 215.0 (x1.11); two epochs give 125.8 vs 162.6
    # (x1.29): the larger model gains more from the second pass. docs/benchmarks.md, "kd demo
    # from a cold cache", has the timing.
    "cpu": Recipe(name="teacher-small", model="teacher-small", max_steps=1200, warmup_steps=120),
    # The same recipe for the ~1/4-size student, for the teacher-vs-student check.
    "cpu-student": Recipe(name="student-tiny", model="student-tiny", max_steps=1200, warmup_steps=120),
    # ~30M parameters, 2x context, ~10 epochs: for a GPU.
    "gpu": Recipe(name="teacher-base", model="teacher-base", max_steps=4000, batch_size=64, seq_len=256, lr=1e-3,
                  lr_embed_mult=10.0, warmup_steps=200, precision="bf16", device="cuda"),
    "gpu-student": Recipe(name="student-tiny-gpu", model="student-tiny", max_steps=4000, batch_size=64, seq_len=256,
                          lr=1e-3, lr_embed_mult=10.0, warmup_steps=200, precision="bf16", device="cuda"),
}


def recipe_overrides(recipe: str | Recipe = "cpu-student") -> list[str]:
    """``key=value`` overrides that give a :class:`~trainer.core.config.TrainConfig` the optimiser
    settings of a recipe (e.g. to train a demo student the way the reference student was)."""
    r = _recipe(recipe)
    keys = ("batch_size", "lr", "lr_embed_mult", "warmup_steps", "min_lr_ratio", "weight_decay", "precision", "device", "seed")
    return [f"{k}={getattr(r, k)}" for k in keys]


def default_cache_dir() -> Path:
    """``$KDSTORE_CACHE`` or ``~/.cache/kdstore``."""
    return Path(os.environ.get("KDSTORE_CACHE") or Path.home() / ".cache" / "kdstore")


def reference_tokenizer(*, cache_dir: str | Path, vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """The byte-level BPE tokenizer of People's Daily train (cached by the tokenizer module)."""
    from trainer.data.tokenizers import prepare_tokenizer  # noqa: PLC0415

    return prepare_tokenizer(kind="bpe", vocab_size=vocab_size, cache_dir=Path(cache_dir) / "tokenizers")


def _recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown reference recipe {recipe!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[recipe]


def cache_key(recipe: Recipe, *, tokenizer_dir: Path, precision: str | None = None) -> str:
    """Hex xxh3-64 of the recipe, model spec, tokenizer identity and training-text hash.

    ``precision``: the resolved precision to key by (default: what ``recipe.precision``
    resolves to on this machine; a shipped artifact is checked with the one it was built with).
    """
    from trainer.data.tokenizers import tokenizer_hash  # noqa: PLC0415
    from trainer.lm.models import spec_dict  # noqa: PLC0415
    from trainer.lm.textdata import load_texts, texts_hash  # noqa: PLC0415

    payload = {
        "recipe": dataclasses.asdict(recipe), "precision": precision or _precision(recipe), "model": spec_dict(recipe.model), "version": RECIPE_VERSION,
        "tokenizer": tokenizer_hash(tokenizer_dir), "train_text": texts_hash(load_texts(recipe.train_text)),
    }
    return xxhash.xxh3_64_hexdigest(json.dumps(payload, sort_keys=True).encode("utf-8"))


def reference_lm(*, cache_dir: str | Path, recipe: str | Recipe, force: bool = False, progress: bool = True,
                 threads: int = 0, tokenizer_dir: str | Path | None = None) -> Path:
    """Train (or reuse) the LM of ``recipe``; returns its HF model directory.

    The directory ``cache_dir/reference/<name>-<key>`` holds the model, its tokenizer,
    ``reference.json`` (metrics) and ``run/`` (config, metrics.jsonl, curves.png).
    It is built under a temporary name and renamed into place when complete.
    ``tokenizer_dir`` replaces the reference BPE tokenizer (tests, other corpora).
    """
    from trainer.lm.student import train  # noqa: PLC0415

    r = _recipe(recipe)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else reference_tokenizer(cache_dir=cache_dir, vocab_size=r.tokenizer_vocab)
    root = Path(cache_dir) / "reference"
    final = root / f"{r.name}-{cache_key(r, tokenizer_dir=tok_dir)}"
    if (final / "reference.json").is_file() and not force:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-"))
    try:
        cfg = recipe_train_config(r, tokenizer_dir=tok_dir, out_dir=tmp / "run", progress=progress, threads=threads)
        t0 = time.perf_counter()
        summary = train(cfg)
        wall = time.perf_counter() - t0
        for item in (tmp / "run" / "model").iterdir():
            shutil.move(str(item), tmp / item.name)
        (tmp / "run" / "model").rmdir()
        shutil.rmtree(tmp / "run" / "checkpoints", ignore_errors=True)  # optimizer state: not needed to reuse
        info = {
            "recipe": dataclasses.asdict(r), "key": final.name.rsplit("-", 1)[-1], "parameters": summary["parameters"],
            "vocab_size": summary["vocab_size"], "eval_ce": summary["eval_ce"], "eval_ppl": summary["eval_ppl"],
            "eval_tokens": summary["eval_tokens"], "train_seconds": summary["train_seconds"], "wall_seconds": wall,
            "step_time_median": summary["step_time_median"], "steps": summary["steps"],
            "tokens_seen": summary["steps"] * r.batch_size * r.seq_len, "tokenizer": str(tok_dir),
            "threads": _threads(), "precision": _precision(r), "cpu_capability": _cpu_capability(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / "reference.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if force and final.exists():
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "reference.json").is_file():
                raise  # someone else finished the same key concurrently otherwise: use theirs
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def recipe_train_config(recipe: Recipe, *, tokenizer_dir: str | Path, out_dir: str | Path, progress: bool = True,
                        threads: int = 0, **overrides: Any):
    """The :class:`~trainer.core.config.TrainConfig` that trains ``recipe`` (``overrides``: e.g.
    ``stop_at=20`` to replay its first steps; the schedule still spans ``max_steps``).

    CPU recipes run on ``BUILD_THREADS`` threads unless ``threads`` says otherwise: the
    intra-op split changes float summation order, so a rebuild is bit for bit only with the
    thread count the shipped teacher was built with.
    """
    from trainer.core.config import TrainConfig  # noqa: PLC0415

    r = recipe
    if threads == 0 and r.device == "cpu":
        threads = BUILD_THREADS
    kw: dict[str, Any] = dict(
        train_text=r.train_text, tokenizer=str(tokenizer_dir), model=r.model, kd_weight=0.0, seq_len=r.seq_len,
        max_steps=r.max_steps, batch_size=r.batch_size, lr=r.lr, lr_embed_mult=r.lr_embed_mult, warmup_steps=r.warmup_steps,
        min_lr_ratio=r.min_lr_ratio, weight_decay=r.weight_decay, precision=r.precision, device=r.device,
        seed=r.seed, eval_data=r.eval_text, eval_every=100, log_every=10, out_dir=str(out_dir),
        progress=progress, threads=threads, keep_checkpoints=1,
    )
    kw.update(overrides)
    return TrainConfig(**kw)


def _cpu_capability() -> str:
    import torch  # noqa: PLC0415

    return torch.backends.cpu.get_cpu_capability()


def _precision(recipe: Recipe) -> str:
    if recipe.precision != "auto":
        return recipe.precision
    import torch  # noqa: PLC0415

    from trainer.lm.student import resolve_precision  # noqa: PLC0415

    if recipe.device.startswith("cuda") and not torch.cuda.is_available():
        return "unavailable"  # training fails later with torch's message about the device
    return resolve_precision(torch.device(recipe.device))


def _threads() -> int:
    import torch  # noqa: PLC0415

    return torch.get_num_threads()


def reference_teacher(*, cache_dir: str | Path | None = None, recipe: str | Recipe = "cpu", force: bool = False,
                      progress: bool = True, threads: int = 0) -> Path:
    """The reference teacher's HF model directory (trained once, then reused)."""
    return reference_lm(cache_dir=cache_dir or default_cache_dir(), recipe=recipe, force=force, progress=progress,
                        threads=threads)


def reference_info(model_dir: str | Path) -> dict[str, Any]:
    """The ``reference.json`` of a reference model directory."""
    return json.loads((Path(model_dir) / "reference.json").read_text(encoding="utf-8"))


def reference_student_baseline(*, cache_dir: str | Path | None = None, recipe: str = "cpu", progress: bool = True,
                               threads: int = 0) -> dict[str, Any]:
    """Teacher and ~1/4-size student trained the same way (CE, same data, steps, schedule):
    ``{"teacher": reference.json, "student": reference.json, "param_ratio", "ppl_ratio"}``."""
    cache = cache_dir or default_cache_dir()
    t = reference_info(reference_teacher(cache_dir=cache, recipe=recipe, progress=progress, threads=threads))
    s = reference_info(reference_lm(cache_dir=cache, recipe=f"{recipe}-student", progress=progress, threads=threads))
    return {"teacher": t, "student": s, "param_ratio": t["parameters"] / s["parameters"],
            "ppl_ratio": s["eval_ppl"] / t["eval_ppl"]}
