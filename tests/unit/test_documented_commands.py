"""What the README and docs/ show runs as written: every ``python -m training ...`` subcommand their
shell blocks name answers ``--help``, and every ``make`` target they name is in the Makefile."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(bash|sh|shell|console)\s*$(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
_TRAINING = re.compile(r"python3?\s+-m\s+training(?:\s+([a-z][a-z-]*))?")
_MAKE = re.compile(r"(?:^|[;&|]\s*|\s)make\s+((?:[A-Za-z][\w-]*\s*)+)")


def shell_lines(document: Path) -> list[str]:
    """The commands of a document's fenced shell blocks, continuation lines joined, comments dropped."""
    lines: list[str] = []
    for _, block in _FENCE.findall(document.read_text(encoding="utf-8")):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split(" #", 1)[0].removeprefix("$ ").strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


def documented() -> tuple[set[str], set[str]]:
    """(training subcommands, make targets) the documents name."""
    subcommands, targets = set(), set()
    for document in DOCUMENTS:
        for line in shell_lines(document):
            subcommands.update(m.group(1) for m in _TRAINING.finditer(line) if m.group(1))
            for m in _MAKE.finditer(line):
                targets.update(t for t in m.group(1).split() if "=" not in t)
    return subcommands, targets


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.MULTILINE))


def test_the_documents_show_commands_at_all() -> None:
    subcommands, targets = documented()
    assert {"run", "recommend"} <= subcommands and {"demo", "test"} <= targets


def test_every_documented_make_target_exists() -> None:
    _, targets = documented()
    assert sorted(targets - makefile_targets()) == []


@pytest.mark.parametrize("subcommand", sorted(documented()[0]))
def test_every_documented_training_subcommand_answers_help(subcommand: str) -> None:
    done = subprocess.run([sys.executable, "-m", "training", subcommand, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
