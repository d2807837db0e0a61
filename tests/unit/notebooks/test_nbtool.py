"""The committed notebooks hold no outputs, and ``make notebooks-clean`` (nbtool strip) removes them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from notebooks.nbtool import dumps, main, notebooks, problems, read, strip

NAMES = ["00-setup.ipynb", "01-train-retrieval.ipynb", "02-train-ranker.ipynb", "03-inference.ipynb"]


def test_the_four_notebooks_exist() -> None:
    assert [p.name for p in notebooks()] == NAMES


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path: Path) -> None:
    nb = read(path)
    assert problems(nb) == [], f"{path.name} holds outputs: run `make notebooks-clean`"
    assert dumps(strip(copy.deepcopy(nb))) == path.read_text(encoding="utf-8"), "run `make notebooks-clean`"


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name)
def test_first_cell_says_what_it_creates_costs_and_where_the_teardown_is(path: Path) -> None:
    first = read(path)["cells"][0]
    text = "".join(first["source"])
    assert first["cell_type"] == "markdown"
    for word in ("Creates", "Cost", "Teardown", "python -m training teardown"):
        assert word in text, f"{path.name}: first cell lacks {word!r}"


def dirty_notebook() -> dict:
    return {
        "cells": [
            {"cell_type": "markdown", "id": "a", "metadata": {}, "source": ["# x"]},
            {"cell_type": "code", "id": "b", "execution_count": 3, "source": ["1 + 1"],
             "metadata": {"execution": {"iopub.status.busy": "2026-01-01"}, "tags": ["keep"]},
             "outputs": [{"output_type": "execute_result", "execution_count": 3, "data": {"text/plain": "2"},
                          "metadata": {}}]},
        ],
        "metadata": {"kernelspec": {"name": "python3"}, "language_info": {"name": "python", "version": "3.11.2"}},
        "nbformat": 4, "nbformat_minor": 5,
    }


def test_strip_removes_outputs_counts_and_run_metadata() -> None:
    nb = dirty_notebook()
    assert problems(nb) == ["cell 1: 1 outputs", "cell 1: execution count 3"]
    strip(nb)
    code = nb["cells"][1]
    assert (code["outputs"], code["execution_count"], code["metadata"]) == ([], None, {"tags": ["keep"]})
    assert nb["metadata"]["language_info"] == {"name": "python"} and problems(nb) == []


def test_check_then_strip_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.ipynb"
    path.write_text(json.dumps(dirty_notebook()))
    assert main(["check", str(path)]) == 1
    assert "make notebooks-clean" in capsys.readouterr().out
    assert main(["strip", str(path)]) == 0
    assert main(["check", str(path)]) == 0
    stripped = path.read_text()
    assert main(["strip", str(path)]) == 0 and path.read_text() == stripped  # idempotent
