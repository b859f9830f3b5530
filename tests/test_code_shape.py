"""Shape rules of the source tree (CONTRIBUTING: files <= 500 lines, functions <= 80 lines).

Only the training loops themselves may be longer: they read top to bottom like nanoGPT's
train.py, and cutting them into pieces would hide the order of a step. Anything else that grows
past a limit fails here with its path and size; split it (a helper, a module) rather than
adding it to the allow-list.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("kdstore", "pipelines", "trainer", "bench")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
# path::function -> why it may be longer than MAX_FUNCTION_LINES
TRAINING_LOOPS = {
    "trainer/lm/student.py::_train": "the LM distillation / CE training loop",
    "trainer/classify/loop.py::train_classifier": "the classifier loop shared by R-Drop and the cascade",
    "trainer/continual/loop.py::_train": "the continual multi-task pre-training loop",
    "trainer/continual/finetune.py::finetune": "the downstream fine-tuning loop of the continual recipe",
}


def _sources() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def _functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_the_walk_sees_the_tree():
    files = {p.relative_to(ROOT).as_posix() for p in _sources()}
    assert {"trainer/lm/student.py", "trainer/classify/loop.py", "kdstore/store.py"} <= files
    for key in TRAINING_LOOPS:  # the allow-list names real functions (a rename must update it)
        path, name = key.split("::")
        assert name in dict(_functions(ROOT / path)), f"{key}: no such function; update TRAINING_LOOPS"


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_source_file_over_the_line_limit(folder):
    long = {p.relative_to(ROOT).as_posix(): n for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines (split them): {long}"


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_function_over_the_line_limit_except_training_loops(folder):
    long = {}
    for p in (ROOT / folder).rglob("*.py"):
        rel = p.relative_to(ROOT).as_posix()
        for name, n in _functions(p):
            if n > MAX_FUNCTION_LINES and f"{rel}::{name}" not in TRAINING_LOOPS:
                long[f"{rel}::{name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"
