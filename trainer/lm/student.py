"""The training loop: student distillation from a store, and plain CE training of a causal LM.

``kd train student --store URI --student-config preset|FILE [key=value ...]`` and
``kd train lm --train-text SOURCE --tokenizer DIR [key=value ...]`` both run
:func:`train`, which reads top to bottom: set-up (processes, data, models, optimizer,
resume), then per step: forward -> loss -> backward -> clip -> step -> log, with periodic
evaluation and checkpoints, and at the end a final evaluation, checkpoint, model
directory, ``result.json`` and PNG curves.

Loss (per micro-batch, fp32, averaged over valid positions)::

    loss = (1 - kd_weight) * CE(labels) + kd_weight * KD

where KD is the sparse KL to the store's targets (:func:`trainer.core.losses.sparse_kd_loss`)
or, with ``online_teacher=DIR``, the full-vocabulary KL to a teacher run on every batch
(:func:`trainer.core.losses.dense_kd_loss`); ``kd_weight=0`` is the CE-only baseline. CE and KD
share one log-softmax (:func:`trainer.core.losses.ce_and_sparse_kd_loss`, ``ce_and_dense_kd_loss``).

Data parallel: run under ``torchrun --nproc_per_node N -m kdstore.cli train student ...``;
each rank reads its own shard of the store (or of the text windows), gradients are
averaged by DDP (gloo on CPU, nccl on GPU), rank 0 logs and writes checkpoints holding
every rank's data-loader and RNG state.

Outputs in ``out_dir``: ``config.json``, ``metrics.jsonl`` (one JSON object per log/eval
event), ``checkpoints/ckpt-<step>.pt``, ``model/`` (HF directory), ``result.json``,
``curves.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from trainer.core import checkpoint as ckpt_io
from trainer.core.config import XTOK_VOCABS, TrainConfig, apply_overrides, format_config, from_dict, to_dict
from trainer.lm.evaluate import autocast, evaluate, model_inputs
from trainer.core.fused import DEFAULT_CHUNK, fused_ce_and_sparse_kd
from trainer.core.losses import (
    ce_and_dense_kd_loss, ce_and_stored_kd_loss, ce_loss, chain_merged_kd_loss, mix, uld_loss,
)
from trainer.lm.models import PRESETS, count_parameters, vocab_size_of
from trainer.core.runlog import RunLog, json_safe, mean, median
from trainer.core.schedule import lr_schedule
from trainer.core.runtime import Dist, param_digest, resolve_precision, seed_all
from trainer.lm.sources import TrainData, build_student, eval_source, load_teacher


# =========================================================================================
# The loop
# =========================================================================================
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training; returns the summary also written to ``out_dir/result.json``."""
    cfg.validate()
    dist = Dist.start(cfg)
    try:
        if cfg.precision == "auto":
            cfg = apply_overrides(cfg, [f"precision={resolve_precision(dist.device)}"])
        return _train(cfg, dist)
    finally:
        dist.stop()


def _train(cfg: TrainConfig, dist: "Dist") -> dict[str, Any]:
    out = Path(cfg.out_dir)
    resume = ckpt_io.load_checkpoint(cfg.resume) if cfg.resume else None
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        print(f"== train config ({'resumed from ' + resume['path'] if resume else 'new run'}; * = not the default)")
        print(format_config(cfg), flush=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # -- data, models -----------------------------------------------------------------
    seed_all(cfg.seed)
    data = TrainData.open(cfg, dist)
    teacher = load_teacher(cfg.online_teacher, dist.device) if cfg.online_teacher else None
    model = build_student(cfg, data, min_vocab=vocab_size_of(teacher) if teacher is not None else 0).to(dist.device)
    eval_teacher = teacher if not cfg.eval_teacher or cfg.eval_teacher == cfg.online_teacher else load_teacher(cfg.eval_teacher, dist.device)
    held_out = eval_source(cfg, data, dist) if cfg.eval_data else None
    n_params = count_parameters(model)
    if dist.is_main:
        print(f"student: {n_params:,} parameters, vocab {vocab_size_of(model)}; data: {data.describe()}"
              + (f"; online teacher: {count_parameters(teacher):,} parameters" if teacher is not None else ""), flush=True)
    net = dist.wrap(model)

    # -- optimizer, schedule, resume --------------------------------------------------
    optimizer = _optimizer(cfg, model)
    scheduler = lr_schedule(optimizer, shape="cosine", warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps,
                            min_lr_ratio=cfg.min_lr_ratio)
    step = 0
    if resume is not None:
        step = _restore(resume, cfg, dist, model, optimizer, scheduler, data)
    else:
        # Per-rank streams for dropout etc.; rank 0 of a DDP run draws like a single process.
        seed_all(cfg.seed + 1_000_003 * dist.rank)
    log = RunLog(out / "metrics.jsonl", resume_step=step if resume else None, enabled=dist.is_main, tensorboard=cfg.tensorboard)
    audit = _SampleAudit(out, dist, resume=resume is not None) if cfg.record_samples else None

    # -- train ------------------------------------------------------------------------
    stop = cfg.stop_at if 0 < cfg.stop_at < cfg.max_steps else cfg.max_steps
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (dist.is_main and cfg.progress), desc="train", dynamic_ncols=True)
    step_times: list[float] = []
    cpu_times: list[float] = []
    window: dict[str, list[float]] = {}
    if held_out is not None and cfg.eval_every and step == 0:
        # The curve starts at the init; eval_kl=final runs the teacher only at the end.
        log.eval(0, _run_eval(cfg, model, held_out, eval_teacher if cfg.eval_kl == "every" else None, dist), bar)
    t_train = time.perf_counter()
    model.train()
    while step < stop:
        t0, c0 = time.perf_counter(), time.process_time()
        stats = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "tokens": 0.0, "data_s": 0.0}
        for micro in range(cfg.grad_accum):
            td = time.perf_counter()
            batch = data.next_batch()
            stats["data_s"] += time.perf_counter() - td
            if audit is not None:
                audit.write(step, batch)
            with dist.no_sync(net, last=micro == cfg.grad_accum - 1):
                loss, ce, kd, n_tok = _loss(cfg, net, teacher, batch, dist.device)
                (loss / cfg.grad_accum).backward()
            stats["loss"] += float(loss.detach()) / cfg.grad_accum
            stats["ce"] += float(ce) / cfg.grad_accum
            stats["kd"] += float(kd) / cfg.grad_accum
            stats["tokens"] += n_tok
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm if cfg.clip_norm > 0 else math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        step_times.append(dt)
        cpu_times.append(time.process_time() - c0)
        # cpu_s (process CPU time, all threads) tells compute from waiting on a shared machine.
        stats.update(grad_norm=float(grad_norm), step_s=dt, cpu_s=time.process_time() - c0, lr=scheduler.get_last_lr()[0])
        for k, v in stats.items():
            window.setdefault(k, []).append(v)
        bar.update(1)
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(
                f"step {step}: loss is {stats['loss']} (ce {stats['ce']}, kd {stats['kd']}); lower lr= or use precision=fp32"
            )

        # -- log, evaluate, checkpoint -----------------------------------------------
        if step % cfg.log_every == 0 or step == stop:
            rec = log.train(step, window, world=dist.world_size)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", ce=f"{rec['ce']:.3f}", lr=f"{rec['lr']:.2e}")
            window = {}
        if held_out is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            log.eval(step, _run_eval(cfg, model, held_out, eval_teacher if cfg.eval_kl == "every" else None, dist), bar)
        if (cfg.save_every and step % cfg.save_every == 0) or step == stop:
            _save(cfg, dist, step, model, optimizer, scheduler, data)
    bar.close()
    train_s = time.perf_counter() - t_train

    # -- finish -----------------------------------------------------------------------
    summary: dict[str, Any] = {
        "steps": step, "finished": step >= cfg.max_steps, "parameters": n_params, "vocab_size": vocab_size_of(model),
        "train_seconds": train_s, "step_time_median": median(step_times), "step_time_mean": mean(step_times),
        "step_cpu_median": median(cpu_times), "threads": torch.get_num_threads(),
        "world_size": dist.world_size, "data": data.describe(),
    }
    if held_out is not None and step >= cfg.max_steps:
        ev = _run_eval(cfg, model, held_out, eval_teacher, dist)
        log.eval(step, ev, None)
        summary.update({f"eval_{k}": v for k, v in ev.items()})
        if cfg.eval_bpc_docs and data.tokenizer is not None and not _is_store(cfg.eval_data):
            from trainer.lm.evaluate import bits_per_char  # noqa: PLC0415
            from trainer.lm.textdata import load_texts  # noqa: PLC0415

            summary["eval_bpc"] = bits_per_char(model, data.tokenizer, load_texts(cfg.eval_data)[: cfg.eval_bpc_docs],
                                                seq_len=cfg.seq_len, device=dist.device, batch_size=cfg.eval_batch_size)
            if dist.is_main:
                print(f"held-out bits per character (student's own tokenization): {summary['eval_bpc']:.4f}", flush=True)
    if dist.world_size > 1:
        (out / f"rank-{dist.rank}.json").write_text(json.dumps({"rank": dist.rank, "param_digest": param_digest(model)}) + "\n")
    if dist.is_main:
        if cfg.save_model and step >= cfg.max_steps:
            _save_model_dir(model, data.tokenizer, out / "model")
            summary["model_dir"] = str(out / "model")
        summary["history"] = log.history
        (out / "result.json").write_text(json.dumps(json_safe(summary), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if cfg.plots:
            log.plot(out / "curves.png", train_keys=("loss", "ce", "kd"), train_ylabel="nats / token",
                     eval_keys=(("eval_ce", "held-out CE"), ("eval_kl", "held-out KL to teacher")), eval_ylabel="nats / token")
        ev = summary.get("eval_ce")
        print(f"done: {step} steps in {train_s:.1f}s (median step {summary['step_time_median'] * 1000:.0f} ms)"
              + (f"; held-out CE {ev:.4f} (ppl {summary['eval_ppl']:.2f})" if ev is not None else "")
              + (f", KL {summary['eval_kl']:.4f}" if ev is not None and math.isfinite(summary["eval_kl"]) else ""),
              flush=True)
    return summary


def _loss(cfg: TrainConfig, net: torch.nn.Module, teacher: torch.nn.Module | None, batch: dict[str, Any],
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Forward one micro-batch; returns (loss, ce, kd, target tokens). Losses in fp32."""
    inputs = model_inputs(batch, device)
    labels = batch["labels"].to(device)
    a = cfg.kd_weight
    if cfg.fused_head and teacher is None and "kd_indices" in batch:
        return _fused_loss(cfg, net, inputs, labels, batch, device)
    with autocast(device, cfg.precision):
        logits = net(**inputs).logits
    kw = dict(kind=cfg.kd_loss, temperature=cfg.temperature, chunk_size=cfg.loss_chunk)
    if a > 0.0 and teacher is not None:
        with torch.no_grad(), autocast(device, cfg.precision):
            t_logits = teacher(**inputs).logits
        mask = batch["kd_mask"] if "kd_mask" in batch else batch["attention_mask"]
        ce, kd = ce_and_dense_kd_loss(logits, labels, t_logits, mask.to(device), **kw)
    elif a > 0.0 and cfg.kd_loss == "uld":  # vocabulary-free: sorted probabilities, ids unused
        ce = ce_loss(logits, labels, chunk_size=cfg.loss_chunk)
        kd = uld_loss(logits, batch["kd_probs"].to(device), batch["kd_tail"].to(device), batch["kd_mask"].to(device),
                      student_temperature=cfg.temperature, chunk_size=cfg.loss_chunk)
    elif a > 0.0 and "kd_chain_logc" in batch:  # cross-tokenizer groups merged by the chain rule (GOLD)
        ce = ce_loss(logits, labels, chunk_size=cfg.loss_chunk)
        kd = chain_merged_kd_loss(
            logits, labels, batch["kd_indices"].to(device), batch["kd_probs"].to(device), batch["kd_tail"].to(device),
            batch["kd_mask"].to(device), batch["kd_chain_logc"].to(device), batch["kd_chain_start"].to(device),
            tail_bucket=cfg.tail_bucket,
        )
    elif a > 0.0:
        ce, kd = ce_and_stored_kd_loss(
            logits, labels, batch["kd_indices"].to(device), batch["kd_probs"].to(device), batch["kd_tail"].to(device),
            batch["kd_mask"].to(device), tail_bucket=cfg.tail_bucket, beta=cfg.kd_beta, **kw,
        )
    else:
        ce, kd = ce_loss(logits, labels, chunk_size=cfg.loss_chunk), torch.full((), math.nan)
    return mix(ce, kd, a), ce.detach(), kd.detach(), float((labels != -100).sum())


def _fused_loss(cfg: TrainConfig, net: torch.nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Store KD without ``[N, V]`` logits: the decoder's hidden states go through the LM head,
    CE and sparse KD chunk by chunk (:mod:`trainer.core.fused`); same values as the path above."""
    if hasattr(net, "module"):
        # DDP prepares its gradient reduction in its own forward, which this path bypasses.
        raise ValueError("fused_head=true is single-process for now; run without torchrun, or with fused_head=false "
                         "and loss_chunk=N to bound memory under DDP")
    model = net
    with autocast(device, cfg.precision):
        hidden = model.get_decoder()(**inputs).last_hidden_state
    head = model.get_output_embeddings()
    loss, ce, kd = fused_ce_and_sparse_kd(
        hidden, head.weight, labels, batch["kd_indices"].to(device), batch["kd_probs"].to(device),
        batch["kd_tail"].to(device), batch["kd_mask"].to(device), kd_weight=cfg.kd_weight, bias=head.bias,
        kind=cfg.kd_loss, beta=cfg.kd_beta, temperature=cfg.temperature, tail_bucket=cfg.tail_bucket,
        chunk_size=cfg.loss_chunk or DEFAULT_CHUNK)
    return loss, ce, kd, float((labels != -100).sum())


# =========================================================================================
# Components of the set-up
# =========================================================================================
def _is_store(uri: str) -> bool:
    from kdstore.fs import resolve  # noqa: PLC0415

    try:
        return resolve(uri).exists("manifest.json")
    except Exception:  # noqa: BLE001 - not a URI the filesystem layer knows: text
        return False


def _run_eval(cfg: TrainConfig, model, source, teacher, dist: Dist) -> dict[str, Any]:
    return evaluate(model, source, device=dist.device, precision=cfg.precision, teacher=teacher,
                    max_batches=cfg.eval_batches, loss_chunk=cfg.loss_chunk)


def _optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases and norm gains (1-d tensors): decaying them only hurts.
    # Embedding rows are updated only when their token occurs, so a short run may give them
    # a larger learning rate (lr_embed_mult).
    emb = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in emb], "weight_decay": cfg.weight_decay, "lr": cfg.lr * cfg.lr_embed_mult},
        {"params": [p for p in params if id(p) not in emb and p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if id(p) not in emb and p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


class _SampleAudit:
    """``samples-rank<r>.txt``: one line per micro-batch, the step, then ``sample_id:window`` of every row."""

    def __init__(self, out: Path, dist: Dist, *, resume: bool) -> None:
        self._f = open(out / f"samples-rank{dist.rank}.txt", "a" if resume else "w", encoding="utf-8")  # noqa: SIM115

    def write(self, step: int, batch: dict[str, Any]) -> None:
        ids = batch["sample_id"]
        if "window" in batch:
            ids = [f"{s}:{int(w)}" for s, w in zip(ids, batch["window"])]
        self._f.write(f"{step + 1}\t{' '.join(ids)}\n")
        self._f.flush()


# =========================================================================================
# Checkpoints and resume
# =========================================================================================
def _save(cfg: TrainConfig, dist: Dist, step: int, model, optimizer, scheduler, data: TrainData) -> None:
    loader_states = dist.gather(data.loader.state_dict())
    rng_states = dist.gather(ckpt_io.rng_state())
    if dist.is_main:
        ckpt_io.save_checkpoint(ckpt_io.checkpoint_path(cfg.out_dir, step), {
            "step": step, "config": to_dict(cfg), "world_size": dist.world_size,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "loader": loader_states, "rng": rng_states,
        }, keep=cfg.keep_checkpoints)
    if dist.world_size > 1:
        torch.distributed.barrier()


def _restore(ckpt: dict[str, Any], cfg: TrainConfig, dist: Dist, model, optimizer, scheduler, data: TrainData) -> int:
    if int(ckpt["world_size"]) != dist.world_size:
        raise ValueError(f"{ckpt['path']}: saved with {ckpt['world_size']} processes; resume with the same number "
                         f"(now {dist.world_size}) so every rank continues its own data shard")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    data.loader.load_state_dict(ckpt["loader"][dist.rank])
    ckpt_io.set_rng_state(ckpt["rng"][dist.rank])
    if dist.is_main:
        print(f"resumed at step {ckpt['step']} from {ckpt['path']}", flush=True)
    return int(ckpt["step"])


def _save_model_dir(model, tokenizer, path: Path) -> None:
    model.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


# =========================================================================================
# CLI
# =========================================================================================
def _parser(prog: str, *, lm: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=("Train a causal LM on text with next-token CE (reference teachers)." if lm else
                     "Distil a student from a soft-label store (or run the CE-only / online-teacher baselines)."),
        epilog="Any config key can be set as key=value (see the printed config); flags are shortcuts.",
    )
    if lm:
        p.add_argument("--train-text", help="peoples_daily:<split> | sentiment:<split> | FILE.txt | FILE.jsonl")
        p.add_argument("--tokenizer", help="Hugging Face tokenizer directory")
        p.add_argument("--model", help=f"model preset ({', '.join(PRESETS)}) or JSON file (default teacher-small)")
    else:
        p.add_argument("--store", help="soft-label store URI")
        p.add_argument("--student-config", dest="model",
                       help=f"student preset ({', '.join(PRESETS)}) or JSON file (a preset + overrides, or a HF config)")
        p.add_argument("--kd-weight", type=float, help="a in (1-a)*CE + a*KD; 0 = CE-only baseline")
        p.add_argument("--online-teacher", help="HF model dir run every step (full-vocabulary KD baseline)")
        p.add_argument("--tokenizer", help="student tokenizer dir; another tokenizer than the teacher's trains on the "
                                            "student's own tokenization of the stored text (default: the teacher's)")
        p.add_argument("--align", help="third-vocabulary file for --tokenizer (kd store align-build); default: built at start")
        p.add_argument("--xtok-targets", choices=("boundary", "groups", "chain", "path"),
                       help="cross-tokenizer targets (default boundary; groups adds 1:n group targets; chain = GOLD merge; "
                            "path moves the probability of a multi-token path onto the student token that spells it)")
        p.add_argument("--xtok-vocab", choices=XTOK_VOCABS,
                       help="third vocabulary built at start when --align is not given (default continuation: a "
                            "teacher token's mass spread over the student tokens that start with it, by their counts in "
                            "the stored text; first_piece: all of it on the student's first piece)")
        p.add_argument("--teacher-segmentation-align", metavar="FILE",
                       help="OLD path: the student reads the teacher's tokens mapped by FILE and expects that "
                            "segmentation at inference (warned; never the default)")
    p.add_argument("--eval-data", help="held-out store URI or text source")
    p.add_argument("--out", dest="out_dir", help="output directory")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--resume", help="checkpoint file or run directory to continue (its config is reused)")
    p.add_argument("--overwrite", action="store_true", help="replace the earlier run in --out (its checkpoints, logs, model)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def _config_from_args(args: argparse.Namespace, base: TrainConfig) -> TrainConfig:
    cfg = base
    if args.resume:
        saved = ckpt_io.load_checkpoint(args.resume)
        cfg = from_dict(TrainConfig, saved["config"])
        cfg = apply_overrides(cfg, ["stop_at=0"])
    flags = [f"{k}={v}" for k, v in vars(args).items()
             if k not in ("overrides", "print_config", "resume", "overwrite") and v is not None]
    cfg = apply_overrides(cfg, flags + list(args.overrides))
    if args.resume:
        cfg = apply_overrides(cfg, [f"resume={args.resume}"])
    return cfg


def _run_cli(argv: list[str] | None, prog: str, *, lm: bool) -> int:
    parser = _parser(prog, lm=lm)
    args = parser.parse_args(argv)
    base = TrainConfig(model="teacher-small", kd_weight=0.0, out_dir="runs/lm", train_text="peoples_daily:train") if lm else TrainConfig()
    try:
        cfg = _config_from_args(args, base)
        if args.print_config:
            print(format_config(cfg))
            return 0
        _claim_out_dir(Path(cfg.out_dir), resume=bool(cfg.resume), overwrite=args.overwrite)
        train(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


RUN_FILES = ("checkpoints", "model", "metrics.jsonl", "config.json", "result.json", "curves.png")


def _claim_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a folder that holds an earlier run (its checkpoints would mix
    with the new ones, and ``--resume`` would pick up the old config) unless ``--resume``
    continues it or ``--overwrite`` replaces it; ``--overwrite`` removes only run files."""
    import shutil  # noqa: PLC0415

    if resume or not out.is_dir() or not any(out.iterdir()):
        return
    ours = [p for p in out.iterdir() if p.name in RUN_FILES or p.name.startswith(("rank-", "samples-rank"))]
    others = sorted(p.name for p in out.iterdir() if p not in ours)
    if not overwrite:
        raise ValueError(f"{out}: holds an earlier run ({', '.join(sorted(p.name for p in ours)) or ', '.join(others)}); "
                         f"pass --resume {out} to continue it, --overwrite to replace it, or choose another --out")
    if others:
        raise ValueError(f"{out}: --overwrite only replaces a run folder, and this one also holds {others[:5]}; "
                         f"choose another --out")
    for p in ours:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def main(argv: list[str] | None = None, prog: str = "kd train student") -> int:
    """``kd train student``: distillation from a store (see the module docstring)."""
    return _run_cli(argv, prog, lm=False)


def lm_main(argv: list[str] | None = None, prog: str = "kd train lm") -> int:
    """``kd train lm``: next-token CE training of a causal LM on text."""
    return _run_cli(argv, prog, lm=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
