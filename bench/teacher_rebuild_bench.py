"""Does the recipe still build the shipped reference teacher bit for bit?

    python bench/teacher_rebuild_bench.py            # the full recipe (minutes): final tensor digest
    python bench/teacher_rebuild_bench.py --steps 100  # its first 100 steps: every logged loss/grad norm

Full: :func:`trainer.lm.reference.reference_lm` into an empty cache (tokenizer trained too),
then the rebuilt weights' tensor digest and file sha256 against the artifact's fp32 record.
Partial: :func:`trainer.lm.artifact.replay_early_steps`, every logged point (each 10 steps)
up to ``--steps`` compared exactly with the build's. Both print the build machine and this
one: bits are expected to match only with the same kernels (torch version, threads, CPU
capability, bf16 ISA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._report import markdown_table, write_section  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="cpu")
    ap.add_argument("--steps", type=int, default=0, help="replay only the first N steps (0 = the full recipe)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from trainer.lm import artifact
    from trainer.lm.reference import RECIPES, reference_lm

    shipped = artifact.shipped_artifact(args.recipe)
    if shipped is None:
        raise SystemExit(f"no shipped artifact for recipe {args.recipe!r}")
    info = artifact.verify_artifact(shipped)
    here = artifact.build_machine(info["build"]["threads"], info["build"]["precision"])
    load0, t0 = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kd-rebuild-") as tmp:
        if args.steps:
            res = artifact.replay_early_steps(shipped, out_dir=Path(tmp) / "run", steps=args.steps, progress=not args.no_progress)
            what = f"first {args.steps} steps replayed"
            rows = [[step, a[0], b[0], a[1], b[1], a == b] for step, a, b in res["logged"]]
            detail = markdown_table(["step", "build loss", "replay loss", "build grad norm", "replay grad norm", "identical"], rows)
            identical = res["identical"]
        else:
            d = reference_lm(cache_dir=tmp, recipe=RECIPES[args.recipe], force=True, progress=not args.no_progress,
                             threads=info["build"]["threads"])
            res = artifact.compare_rebuild(d, shipped)
            what = "full recipe rebuilt"
            detail = markdown_table(["", "rebuilt", "artifact's fp32 record"],
                                    [["tensor digest", res["digest"], res["expected_digest"]],
                                     ["model.safetensors sha256", res["sha256"][:16], res["expected_sha256"][:16]]])
            identical = res["identical"]
    wall = time.perf_counter() - t0
    machines = markdown_table(["", "build machine", "this machine"],
                              [[k, info["build"].get(k), here.get(k)] for k in ("torch", "threads", "precision", "cpu_capability",
                                                                                "isa_flags", "machine")])
    print(detail + "\n\n" + machines + "\n" + json.dumps({"identical": identical, "wall_s": wall, "load": load0}, indent=1))
    body = f"""
{what} for recipe `{args.recipe}` (artifact {shipped.name}): **bit for bit: {identical}**; {wall:.0f} s wall at load
average {load0[0]:.1f}.

{detail}

{machines}
"""
    write_section("teacher-rebuild", "Reference teacher rebuilt by its recipe vs the shipped artifact", body)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
