"""The shipped reference teacher: the ``cpu`` recipe's output as a versioned, checksummed artifact.

A fresh machine should not spend 8-17 minutes training the demo's teacher, so the
project ships the result of :func:`trainer.lm.reference.reference_lm` (recipe ``cpu``) in
``trainer/lm/artifacts/<name>-<key>/``: ``model.safetensors`` (fp16 weights, half the
size of fp32 at a measured held-out perplexity change recorded in ``artifact.json``),
``config.json``, ``generation_config.json``, the tokenizer files, and ``artifact.json``:

- ``format``, ``recipe_name``, ``recipe`` (the dataclass), ``key`` (the recipe's cache key:
  :func:`trainer.lm.reference.cache_key`), ``files`` (sha256 of every shipped file);
- ``fp32``: sha256 of the fp32 ``model.safetensors`` the recipe wrote and the tensor digest
  (:func:`trainer.core.runtime.state_digest`) a rebuild must reproduce bit for bit;
- ``eval``: held-out CE / perplexity of the fp32 weights and of the shipped ones;
- ``early_steps``: the build's logged loss / grad-norm (every 10 steps), and the tensor
  digest after ``REPLAY_STEPS`` steps: :func:`replay_early_steps` re-runs the recipe that far
  (seconds) and compares exactly, a cheap proof that the recipe still builds it;
- ``build``: torch version, threads, precision, CPU capability and ISA flags of the build
  machine (what bit-for-bit reproducibility depends on).

:func:`materialize` verifies the checksums and writes an ordinary HF model directory
(fp32 weights) into the cache; a corrupted artifact raises :class:`ArtifactError` that
says to run ``kd demo --rebuild-teacher``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from trainer.core.runtime import state_digest

ARTIFACT_ROOT = Path(__file__).resolve().parent / "artifacts"
ARTIFACT_FORMAT = 1
WEIGHTS = "model.safetensors"
SHIPPED_FILES = (WEIGHTS, "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
REPLAY_STEPS = 10  # the early-steps check: the first logging point (mean loss, grad norm of steps 1-10) and a digest


class ArtifactError(RuntimeError):
    """The shipped teacher is missing, corrupted or does not match its recipe."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shipped_artifact(recipe_name: str = "cpu", *, root: Path | None = None) -> Path | None:
    """The artifact directory shipped for ``recipe_name`` (under ``root``, default
    :data:`ARTIFACT_ROOT`), or None when there is none."""
    root = Path(root) if root is not None else ARTIFACT_ROOT
    if not root.is_dir():
        return None
    for d in sorted(root.iterdir()):
        meta = d / "artifact.json"
        if meta.is_file() and json.loads(meta.read_text(encoding="utf-8")).get("recipe_name") == recipe_name:
            return d
    return None


def artifact_info(path: Path) -> dict[str, Any]:
    """The ``artifact.json`` of an artifact directory."""
    meta = Path(path) / "artifact.json"
    if not meta.is_file():
        raise ArtifactError(f"{path}: no artifact.json; reinstall kdstore or run `kd demo --rebuild-teacher`")
    return json.loads(meta.read_text(encoding="utf-8"))


def verify_artifact(path: Path) -> dict[str, Any]:
    """Check format, file list and every sha256; returns ``artifact.json``. Raises :class:`ArtifactError`."""
    path = Path(path)
    info = artifact_info(path)
    if info.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path}/artifact.json: format {info.get('format')!r}, this kdstore reads {ARTIFACT_FORMAT}; "
                            "reinstall kdstore or run `kd demo --rebuild-teacher`")
    for name, want in info["files"].items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{f}: missing from the shipped reference teacher; reinstall kdstore or run "
                                "`kd demo --rebuild-teacher` to train it by its recipe")
        got = sha256_file(f)
        if got != want:
            raise ArtifactError(f"{f}: sha256 {got[:16]}..., expected {want[:16]}... (artifact.json): the shipped reference "
                                "teacher is corrupted; reinstall kdstore or run `kd demo --rebuild-teacher` to train it "
                                "by its recipe")
    return info


def check_recipe(info: dict[str, Any], path: Path) -> None:
    """The artifact must be the output of the recipe in this code (same fields, same cache key)."""
    from trainer.lm.reference import RECIPES, cache_key  # noqa: PLC0415

    r = RECIPES.get(info["recipe_name"])
    if r is None or dataclasses.asdict(r) != info["recipe"]:
        raise ArtifactError(f"{path}: built by a recipe {info['recipe_name']!r} that differs from this code's "
                            "trainer.lm.reference.RECIPES; run `kd demo --rebuild-teacher` (and re-export the artifact)")
    key = cache_key(r, tokenizer_dir=path, precision=info["build"]["precision"])
    if key != info["key"]:
        raise ArtifactError(f"{path}: cache key {info['key']} != {key} of recipe {info['recipe_name']!r} in this code "
                            "(tokenizer, training text or recipe version changed); run `kd demo --rebuild-teacher`")


def materialize(path: Path, *, cache_dir: str | Path, check_key: bool = True) -> Path:
    """Verify the artifact and return a HF model directory (fp32 weights) built from it in the cache.

    The directory ``cache_dir/reference/<artifact name>-shipped`` holds the model, its tokenizer
    and a ``reference.json`` whose metrics are the shipped weights' own.
    """
    import torch  # noqa: PLC0415
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    path = Path(path)
    info = verify_artifact(path)
    if check_key:
        check_recipe(info, path)
    final = Path(cache_dir) / "reference" / f"{path.name}-shipped"
    stamp = final / "reference.json"
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")).get("artifact_sha256") == info["files"][WEIGHTS]:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        tensors = {k: v.to(torch.float32) for k, v in load_file(str(path / WEIGHTS)).items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        for name in SHIPPED_FILES[1:]:
            shutil.copyfile(path / name, tmp / name)
        ref = {"recipe": info["recipe"], "key": info["key"], **info["reference"], "eval_ce": info["eval"]["shipped"]["ce"], "eval_ppl": info["eval"]["shipped"]["ppl"],
               "artifact": str(path), "artifact_sha256": info["files"][WEIGHTS], "weights_dtype": info["weights_dtype"]}
        (tmp / "reference.json").write_text(json.dumps(ref, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def model_digest(model_dir: str | Path) -> str:
    """:func:`trainer.core.runtime.state_digest` of a saved model's tensors, as stored."""
    from safetensors.torch import load_file  # noqa: PLC0415

    return state_digest(load_file(str(Path(model_dir) / WEIGHTS)))


def compare_rebuild(model_dir: str | Path, path: Path) -> dict[str, Any]:
    """Compare a model rebuilt by the recipe with the artifact's fp32 record (bit for bit)."""
    info = artifact_info(path)
    digest, sha = model_digest(model_dir), sha256_file(Path(model_dir) / WEIGHTS)
    return {"digest": digest, "expected_digest": info["fp32"]["digest"], "identical": digest == info["fp32"]["digest"],
            "sha256": sha, "expected_sha256": info["fp32"]["sha256"]}


def replay_early_steps(path: Path, *, out_dir: str | Path, steps: int = REPLAY_STEPS, progress: bool = False) -> dict[str, Any]:
    """Re-run the first ``steps`` steps of the artifact's recipe (same schedule, threads, precision)
    and compare the logged loss / grad norm and the tensor digest with the build's, exactly.

    Returns ``{"identical": bool, "logged": [(step, recorded, replayed), ...], "digest": ...,
    "expected_digest": ..., "step_time_median": s}``; the digest is compared only when the
    artifact records one for ``steps``.
    """
    from trainer.core.checkpoint import load_checkpoint  # noqa: PLC0415
    from trainer.lm.reference import RECIPES, recipe_train_config  # noqa: PLC0415
    from trainer.lm.student import train  # noqa: PLC0415

    info = artifact_info(path)
    early = info["early_steps"]
    r = RECIPES[info["recipe_name"]]
    cfg = recipe_train_config(r, tokenizer_dir=path, out_dir=out_dir, progress=progress, threads=info["build"]["threads"],
                              precision=info["build"]["precision"], stop_at=steps, eval_data="", plots=False,
                              save_model=False)
    summary = train(cfg)
    logged = {rec["step"]: rec for rec in summary["history"] if rec.get("event") == "train"}
    pairs = []
    for rec in early["logged"]:
        if rec["step"] <= steps:
            got = logged.get(rec["step"], {})
            pairs.append((rec["step"], [rec["loss"], rec["grad_norm"]], [got.get("loss"), got.get("grad_norm")]))
    digest = state_digest(load_checkpoint(str(out_dir))["model"])
    want = early["digest"] if early.get("digest_step") == steps else None
    identical = all(a == b for _, a, b in pairs) and (want is None or digest == want)
    return {"identical": identical, "logged": pairs, "digest": digest, "expected_digest": want,
            "step_time_median": summary["step_time_median"], "steps": steps}


def reproducibility_gap(info: dict[str, Any]) -> str:
    """Why this machine cannot rebuild the artifact's bits ('' when nothing known stands in the way).

    A CPU build is bit for bit only with the same kernels: torch version, thread count, ATen
    CPU capability (vector width), ISA flags (oneDNN's bf16 / AMX paths) and the precision
    the recipe resolves to here.
    """
    import torch  # noqa: PLC0415

    from trainer.core.runtime import resolve_precision  # noqa: PLC0415

    build = info["build"]
    here = build_machine(build["threads"], build["precision"])
    if build["precision"] == "bf16" and resolve_precision(torch.device("cpu")) != "bf16":
        return "the teacher was built with native CPU bf16 (oneDNN); this CPU has none, so its kernels differ"
    for key in ("torch", "cpu_capability", "isa_flags", "machine"):
        if here[key] != build[key]:
            return f"{key} differs from the build machine's ({here[key]} vs {build[key]}): other kernels, other bits"
    return ""


def build_machine(threads: int, precision: str) -> dict[str, Any]:
    """What bit-for-bit reproducibility of a CPU build depends on."""
    import platform  # noqa: PLC0415

    import torch  # noqa: PLC0415

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})
    return {"torch": torch.__version__, "threads": threads, "precision": precision,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "isa_flags": isa, "machine": platform.machine()}


def heldout_eval(model_dir: str | Path, *, recipe_name: str = "cpu", dtype: str = "float32") -> dict[str, float]:
    """Held-out CE / perplexity (fp32 compute) of a model directory whose weights are first
    rounded to ``dtype``: the recipe's validation text, document windows of its ``seq_len``."""
    import torch  # noqa: PLC0415

    from kdstore.tokenizer import load_tokenizer  # noqa: PLC0415
    from trainer.lm.evaluate import evaluate  # noqa: PLC0415
    from trainer.lm.models import load_causal_lm  # noqa: PLC0415
    from trainer.lm.reference import RECIPES  # noqa: PLC0415
    from trainer.lm.textdata import TextBatches, document_windows, encode_texts, load_texts  # noqa: PLC0415

    r = RECIPES[recipe_name]
    model = load_causal_lm(model_dir).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(getattr(torch, dtype)).to(torch.float32))
    tok = load_tokenizer(Path(model_dir))
    windows = sorted(document_windows(encode_texts(tok, load_texts(r.eval_text)), r.seq_len), key=len)
    batches = TextBatches(windows, batch_size=32, shuffle=False, rank=0, world_size=1, pad_id=tok.pad_token_id or 0)
    ev = evaluate(model, batches, device=torch.device("cpu"), precision="fp32")
    return {"ce": ev["ce"], "ppl": ev["ppl"], "tokens": ev["tokens"]}


def export_artifact(model_dir: str | Path, *, recipe_name: str = "cpu", root: Path | None = None, dtype: str = "float16",
                    student_dir: str | Path | None = None, replay: bool = True) -> Path:
    """Write the artifact of a cache entry built by ``reference_lm`` for ``recipe_name``.

    Checks that the entry's recipe and key are this code's, rounds the weights to ``dtype``,
    measures held-out perplexity of the fp32 and the shipped weights side by side, records
    the build's first logged steps and (``replay``) replays them to record a tensor digest.
    ``student_dir``: the reference 1/4-size student of the same recipe, recorded for the
    "teacher clearly beats the student" check.
    """
    import torch  # noqa: PLC0415
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    from trainer.lm.reference import RECIPES, cache_key, reference_info  # noqa: PLC0415

    src = Path(model_dir)
    ref = reference_info(src)
    r = RECIPES[recipe_name]
    if ref["recipe"] != dataclasses.asdict(r):
        raise ArtifactError(f"{src}: its recipe differs from RECIPES[{recipe_name!r}]; rebuild it first")
    key = cache_key(r, tokenizer_dir=src, precision=ref["precision"])
    if key != ref["key"] or not src.name.endswith(key):
        raise ArtifactError(f"{src}: key {ref['key']} but recipe {recipe_name!r} with its tokenizer gives {key}")
    logged = [json.loads(x) for x in (src / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    # Every logged point of the build (each 10 steps): a replay of any length compares against them.
    early = [{"step": x["step"], "loss": x["loss"], "grad_norm": x["grad_norm"]} for x in logged if x.get("event") == "train"]
    root = Path(root) if root is not None else ARTIFACT_ROOT
    dest = root / f"{r.name}-{key}"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{dest.name}.tmp-"))
    try:
        state = load_file(str(src / WEIGHTS))
        save_file({k: v.to(getattr(torch, dtype)) for k, v in state.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        for name in SHIPPED_FILES[1:]:
            shutil.copyfile(src / name, tmp / name)
        keep = ("parameters", "vocab_size", "eval_ce", "eval_ppl", "eval_tokens", "train_seconds", "wall_seconds",
                "step_time_median", "steps", "tokens_seen", "threads", "precision", "created_at")
        info: dict[str, Any] = {
            "format": ARTIFACT_FORMAT, "recipe_name": recipe_name, "recipe": dataclasses.asdict(r), "key": key,
            "weights_dtype": dtype, "files": {},
            "fp32": {"sha256": sha256_file(src / WEIGHTS), "digest": state_digest(state), "bytes": (src / WEIGHTS).stat().st_size},
            "eval": {"fp32": heldout_eval(src, recipe_name=recipe_name), "shipped": heldout_eval(src, recipe_name=recipe_name, dtype=dtype),
                     "during_training": {"ce": ref["eval_ce"], "ppl": ref["eval_ppl"], "precision": ref["precision"]}},
            "reference": {k: ref[k] for k in keep if k in ref},
            "early_steps": {"logged": early},
            "build": {**build_machine(ref["threads"], ref["precision"]), "note": "export machine; the build ran on it"},
        }
        if student_dir is not None:
            s = reference_info(student_dir)
            info["student_baseline"] = {k: s[k] for k in ("parameters", "eval_ce", "eval_ppl", "key")} | {
                "recipe_name": f"{recipe_name}-student", "ppl_ratio": s["eval_ppl"] / ref["eval_ppl"]}
        info["files"] = {name: sha256_file(tmp / name) for name in SHIPPED_FILES}
        (tmp / "artifact.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if replay:
            with tempfile.TemporaryDirectory() as run:
                res = replay_early_steps(tmp, out_dir=run)
            if not res["identical"]:
                raise ArtifactError(f"replaying the first {REPLAY_STEPS} steps did not reproduce the build's log: {res['logged']}")
            info["early_steps"].update(digest=res["digest"], digest_step=REPLAY_STEPS,
                                       note="digest recorded by a replay whose logged losses and grad norms equalled the build's")
            (tmp / "artifact.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.lm.artifact export --from DIR`` | ``verify`` | ``replay``."""
    ap = argparse.ArgumentParser(prog="python -m trainer.lm.artifact", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write the artifact of a reference_lm cache entry")
    e.add_argument("--from", dest="src", required=True, help="cache entry (cache/reference/<name>-<key>)")
    e.add_argument("--student", default=None, help="the reference student's cache entry (same recipe)")
    e.add_argument("--recipe", default="cpu")
    e.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    for name in ("verify", "replay"):
        v = sub.add_parser(name, help="check the shipped artifact's checksums and key" if name == "verify" else
                           f"replay the recipe's first {REPLAY_STEPS} steps and compare exactly")
        v.add_argument("--recipe", default="cpu")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "export":
            dest = export_artifact(args.src, recipe_name=args.recipe, dtype=args.dtype, student_dir=args.student)
            print(json.dumps(artifact_info(dest), indent=1))
            return 0
        path = shipped_artifact(args.recipe)
        if path is None:
            raise ArtifactError(f"no shipped artifact for recipe {args.recipe!r} under {ARTIFACT_ROOT}")
        info = verify_artifact(path)
        check_recipe(info, path)
        if args.cmd == "verify":
            print(f"{path}: checksums and recipe key OK")
            return 0
        with tempfile.TemporaryDirectory() as run:
            res = replay_early_steps(path, out_dir=run)
        print(json.dumps(res, indent=1))
        return 0 if res["identical"] else 1
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
