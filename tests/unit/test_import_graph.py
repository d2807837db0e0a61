"""The layout's promises, read from the source: what the shipped packages import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = (ROOT / "training", ROOT / "code")
TOOLS = ("local_test", "bench", "notebooks", "reliability", "tests")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (``from x import y`` -> ``x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", SHIPPED, ids=lambda p: p.name)
def test_training_and_serving_never_import_the_tools_above_them(package: Path) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] in TOOLS)
        for path in package.rglob("*.py")
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}


def test_serving_never_imports_training_or_torch() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] in ("training", "torch"))
        for path in (ROOT / "code").rglob("*.py")
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}


def test_the_command_line_the_job_entry_and_launch_share_options_without_a_circle() -> None:
    imports = {name: imported_modules(ROOT / "training" / f"{name}.py") for name in ("__main__", "job", "launch",
                                                                                   "run_options")}
    assert not imports["run_options"] & {"training.__main__", "training.job", "training.launch"}
    assert "training.__main__" not in imports["job"] | imports["launch"]
    assert "training.launch" not in imports["job"] and "training.job" not in imports["launch"]
    assert "training.run_options" in imports["__main__"] & imports["launch"]
