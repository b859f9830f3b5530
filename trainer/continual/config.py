"""``kd train continual`` config: one flat dataclass, read from a JSON or TOML file, then
``key=value`` overrides (:func:`trainer.core.config.apply_overrides`, the project's one parser).

The file holds the same flat keys. ``stages`` may be written as the string of
:mod:`trainer.continual.schedule` or, in the file only, as a list of tables::

    [[stages]]                       # TOML
    tasks = { knowledge_mask = 1 }
    steps = 300
    [[stages]]
    tasks = { knowledge_mask = 1, reorder = 2 }
    [[stages]]
    tasks = ["reorder", "kd"]
    drop = ["knowledge_mask"]

which is turned into the string form before the config is built (so overrides, checkpoints
and ``config.json`` all carry one flat value).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.core.config import apply_overrides, from_dict

TASKS = ("knowledge_mask", "token_mask", "token_doc", "reorder", "distance", "kd")


@dataclass
class ContinualConfig:
    """Every knob of ``kd train continual`` (flat; ``--print-config`` lists them)."""

    # -- schedule ----------------------------------------------------------------------------
    tasks: str = "knowledge_mask,token_doc,reorder,distance,kd"  # order of introduction
    strategy: str = "sequential"  # sequential | multitask | continual (ignored when stages is set)
    stages: str = ""  # explicit schedule (trainer.continual.schedule); replaces strategy
    stage_steps: int = 200  # steps per stage when a stage does not say @steps
    weights: str = ""  # loss weight per task, "kd:0.5,reorder:2" (default 1)
    # -- data ----------------------------------------------------------------------------------
    kd_store: str = ""  # soft-label store of the teacher over People's Daily train (kd task)
    kd_eval_store: str = ""  # store over held-out text (kd task's held-out metrics)
    tokenizer: str = ""  # HF tokenizer dir; "" = the kd store teacher's, else the reference BPE tokenizer
    doc_limit: int = 0  # use the first N training articles (0 = all)
    eval_doc_limit: int = 0  # use the first N validation articles for held-out metrics (0 = all 155)
    eval_examples: int = 256  # held-out examples per task and evaluation
    max_len: int = 128  # encoder positions; longer inputs are truncated (the kd store must fit)
    mask_rate: float = 0.15  # share of tokens masked by the masking tasks
    tdr_min_docs: int = 50  # token_doc: label 1 when the word occurs in >= this many other training articles (~half the words)
    reorder_segments: int = 3  # reorder: m segments, m! classes
    kd_alpha: float = 0.5  # kd task: (1 - a) * CE(next token) + a * KL(teacher || encoder)
    kd_temperature: float = 1.0
    # -- model (trainer.classify.classifiers.ClassifierConfig, arch=transformer) ---------------
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.1
    # -- optimisation --------------------------------------------------------------------------
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50  # linear warm-up over the first steps of the run
    lr_schedule: str = "constant"  # constant after warm-up (a later stage is not starved) | linear (decay to 0 at the end)
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads (0 = default)
    # -- loop ----------------------------------------------------------------------------------
    out_dir: str = "runs/continual"
    log_every: int = 20
    save_every: int = 0  # 0 = at the end of every stage only
    keep_checkpoints: int = 2
    stop_at: int = 0  # stop (with a checkpoint) after this step; 0 = run to the end
    resume: str = ""  # checkpoint file or run directory to continue from
    progress: bool = True

    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    def weight_map(self) -> dict[str, float]:
        out = {}
        for item in (x.strip() for x in self.weights.split(",")):
            if not item:
                continue
            name, sep, val = item.partition(":")
            try:
                out[name.strip()] = float(val)
            except ValueError:
                raise ValueError(f"weights: {item!r} is not task:number") from None
            if not sep or out[name.strip()] < 0:
                raise ValueError(f"weights: {item!r} must be task:number with number >= 0")
        return out

    def check(self) -> None:
        """Raise ``ValueError`` naming the key and what to do (schedule checks: build_stages)."""
        for key in ("stage_steps", "batch_size", "eval_examples", "log_every", "reorder_segments", "tdr_min_docs"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr_schedule not in ("constant", "linear"):
            raise ValueError(f"lr_schedule must be constant or linear, got {self.lr_schedule!r}")
        if not 0.0 < self.mask_rate < 1.0:
            raise ValueError(f"mask_rate must be in (0, 1), got {self.mask_rate}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if self.reorder_segments > 5:
            raise ValueError(f"reorder_segments={self.reorder_segments}: {self.reorder_segments}! classes is too many; use 2..5")
        if self.max_len < 8 + 2 * self.reorder_segments:
            raise ValueError(f"max_len={self.max_len} is too short for the sentence tasks; use >= 32")


def build_stages(cfg: ContinualConfig):
    """The validated stages of ``cfg`` (explicit ``stages`` or the named strategy)."""
    from trainer.continual.schedule import check_task_name, derive_stages, parse_stages, validate  # noqa: PLC0415

    if cfg.stages.strip():
        stages = parse_stages(cfg.stages, stage_steps=cfg.stage_steps)
    else:
        tasks = cfg.task_list()
        for t in tasks:
            check_task_name(t, TASKS, "tasks")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks lists a task twice: {cfg.tasks!r}")
        stages = derive_stages(cfg.strategy, tasks, cfg.stage_steps)
    validate(stages, TASKS)
    for name in cfg.weight_map():
        if name not in {t for st in stages for t in st.tasks}:
            raise ValueError(f"weights names {name!r}, which no stage trains")
    return stages


def _stages_from_tables(tables: list[Any], path: str) -> str:
    from trainer.continual.schedule import Stage, format_stages  # noqa: PLC0415

    out = []
    for s, tab in enumerate(tables, 1):
        if not isinstance(tab, dict) or "tasks" not in tab:
            raise ValueError(f"{path}: stages[{s}] must be a table with 'tasks' (and optional 'steps', 'drop')")
        unknown = set(tab) - {"tasks", "steps", "drop"}
        if unknown:
            raise ValueError(f"{path}: stages[{s}] has unknown keys {sorted(unknown)} (allowed: tasks, steps, drop)")
        tasks = tab["tasks"]
        shares = tuple(tasks.items()) if isinstance(tasks, dict) else tuple((t, 1.0) for t in tasks)
        out.append(Stage(steps=int(tab.get("steps", 0)) or -1, shares=tuple((str(t), float(w)) for t, w in shares),
                         dropped=tuple(tab.get("drop", ()))))
    # -1 = "stage_steps": written without @ so parse_stages fills in the default.
    return " | ".join(p.replace(" @-1", "") for p in format_stages(out).split(" | "))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The flat key/value mapping of a ``.json`` or ``.toml`` config file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib  # noqa: PLC0415 - Python >= 3.11
            except ImportError:  # pragma: no cover - Python 3.10
                try:
                    import tomli as tomllib  # noqa: PLC0415
                except ImportError:
                    raise ValueError(f"config file {p}: TOML needs Python >= 3.11 or 'pip install tomli'; "
                                     f"or write the file as JSON") from None
            data = tomllib.loads(text)
        elif p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"config file {p}: expected a .json or .toml file")
    except (json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, ValueError) and "expected a .json" in str(exc):
            raise
        raise ValueError(f"config file {p}: cannot parse ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {p}: expected a table/object of keys")
    if isinstance(data.get("stages"), list):
        data["stages"] = _stages_from_tables(data["stages"], str(p))
    return data


def load_config(path: str | Path | None, overrides: list[str]) -> ContinualConfig:
    """File (optional) then ``key=value`` overrides; unknown keys in either are errors."""
    cfg = ContinualConfig()
    if path:
        data = read_config_file(path)
        try:
            cfg = from_dict(ContinualConfig, data, strict=True)
        except ValueError as exc:
            raise ValueError(f"config file {path}: {exc}") from None
        except TypeError as exc:
            raise ValueError(f"config file {path}: {exc}") from None
    cfg = apply_overrides(cfg, overrides)
    cfg.check()
    return cfg
