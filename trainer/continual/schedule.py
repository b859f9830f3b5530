"""Stages and the per-step task plan of continual multi-task pre-training (ERNIE 2.0).

A run is a list of :class:`Stage` s. Each stage trains a set of tasks for ``steps`` optimizer
steps, one task per step; a task's *share* is its part of the stage's iterations. The plan
(which task trains at global step ``t``) is a pure function of the stages, so a run resumed
mid-stage continues exactly where it stopped: nothing about the schedule needs saving.

Three strategies (the seed's figure), all at the same total steps:

* ``sequential`` (ERNIE 2.0, sequential multi-task): stage ``s`` trains tasks ``1..s``.
* ``multitask``: every stage trains all tasks (all at once from the start).
* ``continual``: stage ``s`` trains task ``s`` only (earlier tasks are dropped, explicitly).

An explicit ``stages`` string replaces the strategy. Stages are separated by ``|``; each is a
comma list of ``task[:share]`` entries, ``-task`` to drop a task trained earlier on purpose,
and an optional ``@steps``::

    knowledge_mask @300 | knowledge_mask, reorder:2 @300 | -knowledge_mask, reorder, kd @400

A stage that leaves out an earlier task without ``-task`` is an error: silently forgetting a
task is the failure sequential multi-task learning exists to avoid.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from fractions import Fraction

STRATEGIES = ("sequential", "multitask", "continual")


@dataclass(frozen=True)
class Stage:
    """One stage: ``shares`` maps task -> share of the stage's ``steps`` (> 0);
    ``dropped`` lists earlier tasks this stage leaves out on purpose."""

    steps: int
    shares: tuple[tuple[str, float], ...]
    dropped: tuple[str, ...] = ()

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.shares)


def check_task_name(name: str, known: tuple[str, ...], where: str) -> None:
    if name not in known:
        close = difflib.get_close_matches(name, known, n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"{where}: unknown task {name!r}{hint} (tasks: {', '.join(known)})")


def derive_stages(strategy: str, tasks: list[str], stage_steps: int) -> list[Stage]:
    """The stages of a named strategy over ``tasks`` in order of introduction."""
    if strategy not in STRATEGIES:
        close = difflib.get_close_matches(strategy, STRATEGIES, n=1)
        raise ValueError(f"unknown strategy {strategy!r}{'; did you mean ' + close[0] + '?' if close else ''} "
                         f"(choose from {', '.join(STRATEGIES)}, or give stages=...)")
    out = []
    for s in range(len(tasks)):
        if strategy == "sequential":
            names, dropped = tasks[: s + 1], ()
        elif strategy == "multitask":
            names, dropped = tasks, ()
        else:
            names, dropped = [tasks[s]], tuple(tasks[:s])
        out.append(Stage(steps=stage_steps, shares=tuple((t, 1.0) for t in names), dropped=dropped))
    return out


def parse_stages(spec: str, *, stage_steps: int) -> list[Stage]:
    """Parse the ``stages`` string (module docstring); names are checked by :func:`validate`."""
    out = []
    for s, part in enumerate(p for p in spec.split("|")):
        body, _, steps_txt = part.partition("@")
        try:
            steps = int(steps_txt) if steps_txt.strip() else stage_steps
        except ValueError:
            raise ValueError(f"stage {s + 1} ({part.strip()!r}): '@{steps_txt.strip()}' is not a step count") from None
        shares, dropped = [], []
        for item in (x.strip() for x in body.split(",")):
            if not item:
                continue
            if item.startswith("-"):
                dropped.append(item[1:].strip())
                continue
            name, _, share_txt = item.partition(":")
            try:
                share = float(share_txt) if share_txt.strip() else 1.0
            except ValueError:
                raise ValueError(f"stage {s + 1}: share {share_txt!r} of {name.strip()!r} is not a number") from None
            shares.append((name.strip(), share))
        out.append(Stage(steps=steps, shares=tuple(shares), dropped=tuple(dropped)))
    return out


def format_stages(stages: list[Stage]) -> str:
    """Inverse of :func:`parse_stages` (canonical form, written to the run's config)."""
    parts = []
    for st in stages:
        items = [f"{t}:{w:g}" for t, w in st.shares] + [f"-{t}" for t in st.dropped]
        parts.append(f"{', '.join(items)} @{st.steps}")
    return " | ".join(parts)


def validate(stages: list[Stage], known: tuple[str, ...]) -> None:
    """Raise ``ValueError`` for unknown tasks, empty stages, bad shares/steps, duplicate tasks,
    and a stage that drops an earlier task without ``-task``."""
    if not stages:
        raise ValueError("no stages: set tasks=... with a strategy, or stages=...")
    ever: set[str] = set()  # trained in some earlier stage
    active: list[str] = []  # trained earlier and not dropped since
    for s, st in enumerate(stages, 1):
        where = f"stage {s}"
        if st.steps < 1:
            raise ValueError(f"{where}: steps must be >= 1, got {st.steps}")
        if not st.shares:
            raise ValueError(f"{where}: trains no task")
        names = [t for t, _ in st.shares]
        for t in names + list(st.dropped):
            check_task_name(t, known, where)
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: a task is listed twice ({', '.join(names)})")
        for t, w in st.shares:
            if not w > 0:
                raise ValueError(f"{where}: share of {t!r} must be > 0, got {w}")
        for t in st.dropped:
            if t in names:
                raise ValueError(f"{where}: {t!r} is both trained and dropped")
            if t not in ever:
                raise ValueError(f"{where}: -{t} drops a task that no earlier stage trained")
        missing = [t for t in active if t not in names and t not in st.dropped]
        if missing:
            raise ValueError(
                f"{where} drops {', '.join(missing)} (trained in an earlier stage) without saying so: list "
                f"{'it' if len(missing) == 1 else 'them'} in the stage to keep training (sequential multi-task), or "
                f"write {', '.join('-' + t for t in missing)} to drop on purpose")
        ever.update(names)
        active = [t for t in active if t not in st.dropped] + [t for t in names if t not in active]


def stage_plan(stage: Stage) -> list[str]:
    """The task of each step of one stage: every prefix of the stage is within one step of
    the shares (no task ever runs a whole step ahead of or behind ``i * count / steps``),
    and the counts are exact at the end (largest remainders decide the leftover steps).

    Earliest deadline first over the steps each task is owed: among the tasks not ahead of
    their share, the one whose next step is due first (step k of a task with c steps is due
    at ``k * steps / c``). Smooth weighted round robin, used before, can fall a step behind
    with five tasks (shares 1, 1, 1, 9, 9 over 65 steps: 1.03 steps).
    """
    total = sum(w for _, w in stage.shares)
    quota = {t: stage.steps * w / total for t, w in stage.shares}
    counts = {t: int(q) for t, q in quota.items()}
    left = stage.steps - sum(counts.values())
    for t in sorted(quota, key=lambda t: (-(quota[t] - counts[t]), stage.tasks.index(t)))[:left]:
        counts[t] += 1
    order = list(counts)
    seen = dict.fromkeys(order, 0)
    out = []
    for i in range(1, stage.steps + 1):
        # Some task is always behind its share: the shortfalls of step i sum to 1.
        due = [t for t in order if seen[t] < counts[t] and seen[t] * stage.steps < i * counts[t]]
        best = min(due, key=lambda t: (Fraction(seen[t] + 1, counts[t]), order.index(t)))  # ties: the earlier task
        seen[best] += 1
        out.append(best)
    return out


def run_plan(stages: list[Stage]) -> list[tuple[int, str]]:
    """``(stage index, task)`` for every global step, in order."""
    return [(s, t) for s, st in enumerate(stages) for t in stage_plan(st)]


def stage_ends(stages: list[Stage]) -> list[int]:
    """Global step count at the end of each stage."""
    ends, n = [], 0
    for st in stages:
        n += st.steps
        ends.append(n)
    return ends
