"""The data path pipelines -> kdstore -> trainer, as import rules checked on the source (``ast``).

* ``kdstore`` (the store library) imports neither ``trainer`` nor ``pipelines``.
* ``trainer`` imports ``pipelines`` only where it runs a capture on purpose: the demo, the
  cascade, and the stores of the reference teacher that the continual and federated recipes
  capture for their KD task.
* ``pipelines`` imports ``trainer`` only in the teacher loader, for the project's classifier
  bundle (lazily; see ``pipelines/teachers.py``).

Every import statement counts, also the lazy ones inside functions, and so do
``importlib.import_module("...")`` calls with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> {forbidden top-level package: files (relative to ROOT) allowed to import it}
RULES = {
    "kdstore": {"trainer": set(), "pipelines": set()},
    "trainer": {"pipelines": {"trainer/demo.py", "trainer/classify/cascade.py", "trainer/continual/store.py",
                              "trainer/federated/tasks.py"}},
    "pipelines": {"trainer": {"pipelines/teachers.py"}},
}


def imported_packages(source: str) -> set[str]:
    """Top-level package names a module's source imports (statements anywhere, and
    ``importlib.import_module`` / ``__import__`` with a literal name)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__"):
                out.add(node.args[0].value.split(".")[0])
    return out


def test_the_scanner_sees_lazy_and_dynamic_imports():
    src = "def f():\n    import trainer.lm\n    from pipelines.capture import run\n    importlib.import_module('kdstore.tools')\n"
    assert imported_packages(src) == {"trainer", "pipelines", "kdstore"}
    assert imported_packages("from . import x\nfrom .y import z\n") == set()  # relative imports stay inside


@pytest.mark.parametrize("package", sorted(RULES))
def test_import_rules(package):
    offenders = []
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources under {package}/"
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        used = imported_packages(path.read_text(encoding="utf-8"))
        for other, allowed in RULES[package].items():
            if other in used and rel not in allowed:
                offenders.append(f"{rel} imports {other}")
    assert not offenders, "import rules broken (see docs/architecture.md):\n" + "\n".join(offenders)


def test_allowed_importers_still_exist():
    for rules in RULES.values():
        for allowed in rules.values():
            for rel in allowed:
                assert (ROOT / rel).is_file(), f"{rel} is allowed an import but no longer exists: update RULES"
