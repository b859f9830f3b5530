"""``kd train continual``: ERNIE 2.0 continual multi-task pre-training (seed 004).

Stages add tasks one by one (:mod:`trainer.continual.schedule`); each step trains one task of
the current stage, chosen by the stage's shares, on the shared encoder with that task's head
and loss (:mod:`trainer.continual.tasks`). After every stage every task of the run is scored on
held-out data: the stage x task matrix that shows what a strategy keeps and what it forgets.

``kd train continual [--config FILE.toml|json] [key=value ...] [--resume RUN_DIR]``;
``--print-config`` lists the keys (docs/continual.md has the task definitions and the file
format). Outputs in ``out_dir``: ``config.json``, ``metrics.jsonl`` (``train`` events with the
running loss of each task, ``stage_eval`` events: one per stage and task), checkpoints
(``checkpoints/ckpt-<step>.pt``: model, optimizer, scheduler, RNG states, config; at every
stage end, every ``save_every`` steps and at ``stop_at``), ``encoder/`` (a classifier bundle
for fine-tuning, see :func:`trainer.continual.model.load_encoder`) and ``result.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from trainer.classify.classifiers import ClassifierConfig, count_parameters
from trainer.continual.config import ContinualConfig, build_stages, load_config
from trainer.continual.model import ContinualModel, save_encoder
from trainer.continual.schedule import Stage, format_stages, run_plan, stage_ends
from trainer.continual.text import Corpus, SpecialIds, document_frequency, load_tokenizer
from trainer.core import checkpoint as ckpt_io
from trainer.core.config import apply_overrides, format_config, from_dict, to_dict
from trainer.core.runlog import RunLog


def _open_store(uri: str, key: str):
    import kdstore  # noqa: PLC0415

    if not uri:
        raise ValueError(f"the kd task needs {key}=STORE (a soft-label store of the teacher; docs/continual.md "
                         f"shows how to capture one)")
    try:
        return kdstore.open(uri)
    except Exception as exc:  # noqa: BLE001 - the store reader raises several types with clear messages
        raise ValueError(f"{key}={uri}: cannot open the store ({exc})") from None


def resolve_tokenizer(cfg: ContinualConfig, needs_kd: bool) -> tuple[str, SpecialIds]:
    """Tokenizer directory and special ids; with a kd task, the store teacher's tokenizer (its
    vocabulary is the KD target space) and a check that ``tokenizer=`` agrees with it."""
    if needs_kd:
        stores = [_open_store(cfg.kd_store, "kd_store"), _open_store(cfg.kd_eval_store, "kd_eval_store")]
        teachers = [s.manifest.teacher for s in stores]
        if teachers[0].vocab_size != teachers[1].vocab_size or teachers[0].name_or_path != teachers[1].name_or_path:
            raise ValueError(f"kd_store and kd_eval_store come from different teachers ({teachers[0].name_or_path} vs "
                             f"{teachers[1].name_or_path}): capture both with the same teacher")
        if stores[0].manifest.level != "token":
            raise ValueError(f"kd_store={cfg.kd_store} is a sequence-level store; the kd task needs token-level soft labels")
        path = cfg.tokenizer or teachers[0].name_or_path
        if not (Path(path) / "tokenizer.json").is_file() and not (Path(path) / "tokenizer_config.json").is_file():
            raise ValueError(f"the store teacher {path!r} is not a local tokenizer directory: set tokenizer=DIR "
                             f"(the teacher's tokenizer)")
        tok = load_tokenizer(path)
        t = teachers[0]
        if t.tokenizer_vocab_size is not None and t.tokenizer_vocab_size != len(tok):
            raise ValueError(f"tokenizer {path} has {len(tok)} tokens but the store's teacher tokenizer had "
                             f"{t.tokenizer_vocab_size}: use the teacher's tokenizer")
        base = t.vocab_size
    else:
        if cfg.tokenizer:
            path = cfg.tokenizer
        else:
            from trainer.lm.reference import default_cache_dir, reference_tokenizer  # noqa: PLC0415

            path = str(reference_tokenizer(cache_dir=default_cache_dir()))
        tok = load_tokenizer(path)
        base = -(-len(tok) // 64) * 64  # padded as the reference models pad their embeddings
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return str(path), SpecialIds(base=base, pad=pad)


def build_tasks(cfg: ContinualConfig, names: list[str], tokenizer_path: str, special: SpecialIds) -> dict[str, Any]:
    """Every task of the run, with its data, before any training step (errors come early)."""
    from trainer.continual import tasks as T  # noqa: PLC0415
    from trainer.data.corpora import peoples_daily_documents  # noqa: PLC0415

    tok = load_tokenizer(tokenizer_path)
    all_train = peoples_daily_documents("train")
    train_docs = all_train[: cfg.doc_limit] if cfg.doc_limit else all_train
    valid_docs = peoples_daily_documents("validation")
    valid_docs = valid_docs[: cfg.eval_doc_limit] if cfg.eval_doc_limit else valid_docs
    train, valid = Corpus.build(train_docs, tok), Corpus.build(valid_docs, tok)
    common = {"cfg": cfg, "special": special, "train": train, "valid": valid}
    out: dict[str, Any] = {}
    for name in names:
        if name in ("knowledge_mask", "token_mask"):
            out[name] = T.MaskTask(name=name, **common)
        elif name == "token_doc":
            out[name] = T.TokenDocTask(name=name, df=document_frequency(all_train), own_docs=True, **common)
        elif name in T.SENTENCE_TASKS:
            out[name] = T.SentenceTask(name=name, **common)
        elif name == "kd":
            out[name] = T.KDTask(name=name, **common)
    return out


def _save(out: Path, step: int, cfg: ContinualConfig, stages: list[Stage], model, optimizer, scheduler, counts) -> None:
    ckpt_io.save_checkpoint(ckpt_io.checkpoint_path(out, step), {
        "step": step, "config": to_dict(cfg), "stages": format_stages(stages), "model_config": to_dict(model.config),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": ckpt_io.rng_state(), "task_batches": dict(counts)}, keep=cfg.keep_checkpoints)


def train(cfg: ContinualConfig) -> dict[str, Any]:
    """Run ``cfg``; returns ``result.json``'s content (``matrix[stage][task]`` = held-out metric)."""
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg: ContinualConfig) -> dict[str, Any]:
    cfg.check()
    stages = build_stages(cfg)
    names = list(dict.fromkeys(t for st in stages for t in st.tasks))
    weights = cfg.weight_map()
    tok_path, special = resolve_tokenizer(cfg, "kd" in names)
    tasks = build_tasks(cfg, names, tok_path, special)  # all data errors surface here, before step 1

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(format_config(cfg), flush=True)
    print(f"[continual] stages: {format_stages(stages)}", flush=True)
    (out / "config.json").write_text(json.dumps({**to_dict(cfg), "resolved_stages": format_stages(stages)}, indent=2,
                                                ensure_ascii=False), encoding="utf-8")
    torch.manual_seed(cfg.seed)
    mcfg = ClassifierConfig(arch="transformer", vocab_size=special.size, num_classes=2, pad_id=special.pad,
                            d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_ff=cfg.d_ff,
                            max_len=cfg.max_len, dropout=cfg.dropout)
    model = ContinualModel(config=mcfg, heads={n: tasks[n].head_size for n in names}).to(cfg.device)
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup  # noqa: PLC0415

    plan, ends = run_plan(stages), stage_ends(stages)
    total = len(plan)
    optimizer = torch.optim.AdamW(model.trained_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = min(cfg.warmup_steps, total)
    scheduler = (get_constant_schedule_with_warmup(optimizer, warm) if cfg.lr_schedule == "constant"
                 else get_linear_schedule_with_warmup(optimizer, warm, total))
    start = 0
    if cfg.resume:
        ckpt = ckpt_io.load_checkpoint(cfg.resume)
        if ckpt["stages"] != format_stages(stages) or ckpt["model_config"] != to_dict(mcfg):
            raise ValueError(f"{ckpt['path']}: saved for a different schedule or model ({ckpt['stages']}); resume with "
                             f"the run's own config")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        ckpt_io.set_rng_state(ckpt["rng"])
        start = int(ckpt["step"])
        print(f"[continual] resumed at step {start} (stage {plan[min(start, total - 1)][0] + 1}) from {ckpt['path']}",
              flush=True)
    # Batch k of a task is a pure function of (seed, task, k): the counts so far follow from the plan.
    counts = Counter(t for _, t in plan[:start])
    n_params = count_parameters(model.backbone.encoder)
    print(json.dumps({"tasks": names, "steps": total, "encoder_parameters": n_params, "vocab": special.size,
                      "train_articles": len(tasks[names[0]].train_corpus.docs)}), flush=True)

    from tqdm.auto import tqdm  # noqa: PLC0415

    log = RunLog(out / "metrics.jsonl", resume_step=start if cfg.resume else None,
                 tensorboard=getattr(cfg, "tensorboard", False))
    last = min(total, cfg.stop_at) if cfg.stop_at else total
    window: dict[str, list[float]] = {}
    model.train()
    bar = tqdm(total=total, initial=start, desc="continual", disable=not cfg.progress, dynamic_ncols=True)
    t_start = time.perf_counter()
    for step in range(start, last):
        stage, name = plan[step]
        task = tasks[name]
        batch = task.batch(counts[name])
        counts[name] += 1
        loss, _, _ = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        (weights.get(name, 1.0) * loss).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.trained_parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{name} loss is {value} at step {step + 1}: lower lr={cfg.lr}")
        window.setdefault(name, []).append(value)
        window.setdefault("grad_norm", []).append(float(grad_norm))
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == last or done in ends:
            rec = {"event": "train", "step": done, "stage": stage + 1, "lr": scheduler.get_last_lr()[0],
                   **{f"loss_{k}" if k in tasks else k: sum(v) / len(v) for k, v in window.items()}}
            log.write(rec)
            bar.set_postfix(stage=stage + 1, task=name, loss=f"{value:.3f}")
            window = {}
        if done in ends:
            _stage_eval(model, tasks, stages, stage, done, log, bar)
        if done in ends or done == last or (cfg.save_every and done % cfg.save_every == 0):
            _save(out, done, cfg, stages, model, optimizer, scheduler, counts)
    bar.close()
    if last < total:
        print(f"[continual] stopped at step {last} (stop_at); continue with --resume {out}", flush=True)
        return {"out_dir": str(out), "steps": last, "stopped": True}
    matrix: dict[str, dict[str, float]] = {}
    for rec in log.history:
        if rec.get("event") == "stage_eval":
            matrix.setdefault(str(rec["stage"]), {})[rec["task"]] = rec["metric"]
    result = {"out_dir": str(out), "stages": format_stages(stages), "tasks": names, "steps": total,
              "steps_per_task": dict(Counter(t for _, t in plan)), "matrix": matrix, "encoder_parameters": n_params,
              "train_seconds": time.perf_counter() - t_start, "encoder": str(out / "encoder")}
    save_encoder(out / "encoder", model, extra={"tokenizer": tok_path, "special_ids": {"base": special.base, "pad": special.pad},
                                                "stages": format_stages(stages), "max_len": cfg.max_len})
    (out / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


def _stage_eval(model, tasks, stages, stage: int, step: int, log: RunLog, bar) -> None:
    """Score every task on its held-out set (tasks not trained yet give their untrained level)."""
    trained = {t for st in stages[: stage + 1] for t in st.tasks}
    model.eval()
    parts = []
    for name, task in tasks.items():
        r = task.evaluate(model)
        log.write({"event": "stage_eval", "stage": stage + 1, "step": step, "task": name, "metric": r.metric,
                   "trained": name in trained, "in_stage": name in stages[stage].tasks, **r.extras})
        parts.append(f"{name} {r.metric:.3f}")
    model.train()
    bar.write(f"stage {stage + 1} @ {step}: " + ", ".join(parts))


def main(argv: list[str] | None = None, prog: str = "kd train continual") -> int:
    """``kd train continual``: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog=prog, description="ERNIE 2.0 continual multi-task pre-training on People's Daily (seed 004).",
        epilog="Any config key can be set as key=value after the file (--print-config lists them); "
               "--finetune sentiment|pos --encoder DIR fine-tunes a saved encoder instead.")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--config", help="JSON or TOML file of config keys (stages as a string or [[stages]] tables)")
    parser.add_argument("--resume", help="checkpoint file or run directory to continue (its config is reused)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and stages, then exit")
    parser.add_argument("--finetune", choices=("sentiment", "pos"), help="fine-tune an encoder on a downstream task")
    parser.add_argument("--encoder", help="with --finetune: encoder directory (omit for the from-scratch baseline)")
    args = parser.parse_args(argv)
    try:
        if args.finetune:
            from trainer.continual.finetune import FinetuneConfig, finetune  # noqa: PLC0415

            fcfg = apply_overrides(FinetuneConfig(task=args.finetune, encoder=args.encoder or ""), args.overrides)
            print(json.dumps(finetune(fcfg), ensure_ascii=False))
            return 0
        if args.resume:
            saved = from_dict(ContinualConfig, ckpt_io.load_checkpoint(args.resume)["config"])
            cfg = apply_overrides(saved, ["stop_at=0", *args.overrides, f"resume={args.resume}"])
        else:
            cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(format_config(cfg))
            print(f"stages: {format_stages(build_stages(cfg))}")
            return 0
        result = train(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: result[k] for k in ("out_dir", "steps", "matrix") if k in result}, ensure_ascii=False))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
