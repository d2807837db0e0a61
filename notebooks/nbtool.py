"""Keep the notebooks clean in git, and run them headless.

    python notebooks/nbtool.py strip [NOTEBOOK ...]   # drop outputs, execution counts, run metadata (make notebooks-clean)
    python notebooks/nbtool.py check [NOTEBOOK ...]   # exit 1 if any notebook holds them
    python notebooks/nbtool.py run [--out DIR]        # execute all four in order into DIR (make notebooks)

Without NOTEBOOK arguments: every ``notebooks/*.ipynb``. ``strip`` and ``check`` need only the
standard library; ``run`` uses ``nbclient`` (requirements/dev.txt) with the ``python3`` kernel of
the Python that runs it, in the environment it is given (see ``local_test/workspace.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# What running a notebook adds to a cell's metadata (nbclient's timings, Jupyter's UI state).
RUN_METADATA = ("execution", "collapsed", "scrolled")


def notebooks() -> list[Path]:
    """The walkthrough's notebooks, in the order they run."""
    return sorted(HERE.glob("[0-9][0-9]-*.ipynb"))


def strip(nb: dict[str, Any]) -> dict[str, Any]:
    """The notebook without outputs, execution counts and run metadata (in place; also returned)."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        for key in RUN_METADATA:
            cell.get("metadata", {}).pop(key, None)
    language = nb.get("metadata", {}).get("language_info")
    if isinstance(language, dict):  # the kernel fills in its version, mimetype, ...
        nb["metadata"]["language_info"] = {"name": language.get("name", "python")}
    return nb


def problems(nb: Mapping[str, Any]) -> list[str]:
    """What ``strip`` would remove: one line per cell that holds outputs or an execution count."""
    found = []
    for index, cell in enumerate(nb.get("cells", [])):
        if cell.get("outputs"):
            found.append(f"cell {index}: {len(cell['outputs'])} outputs")
        if cell.get("execution_count") is not None:
            found.append(f"cell {index}: execution count {cell['execution_count']}")
    return found


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def dumps(nb: Mapping[str, Any]) -> str:
    """JSON exactly as nbformat writes it, so a clean notebook strips to the same bytes."""
    return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False, separators=(",", ": ")) + "\n"


def execute(path: Path, env: Mapping[str, str] | None = None, timeout: int = 3600) -> Any:
    """Run ``path`` top to bottom (see :func:`run`) and return the executed notebook."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    run(nb, path.parent, env, timeout)
    return nb


def run(nb: Any, cwd: Path, env: Mapping[str, str] | None = None, timeout: int = 3600) -> None:
    """Execute ``nb`` in place in a fresh ``python3`` kernel of this Python, in folder ``cwd``, with
    environment ``env`` (default: ours). A cell error raises nbclient's ``CellExecutionError``;
    ``nb`` then holds the outputs up to and including the error."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute(**({"env": dict(env)} if env is not None else {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python notebooks/nbtool.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("strip", "check"):
        sub.add_parser(name).add_argument("paths", nargs="*", type=Path)
    run = sub.add_parser("run")
    run.add_argument("--out", type=Path, default=Path("out/notebooks/executed"),
                     help="where the executed copies go (default out/notebooks/executed)")
    args = parser.parse_args(argv)

    if args.command == "run":
        return _run_all(args.out)
    dirty = 0
    for path in args.paths or notebooks():
        nb = read(path)
        found = problems(nb)
        if args.command == "strip":
            text = dumps(strip(nb))
            if text != path.read_text(encoding="utf-8"):
                path.write_text(text, encoding="utf-8")
                print(f"stripped {path}")
        elif found:
            dirty += 1
            print(f"{path}: {'; '.join(found)} (make notebooks-clean)")
    return 1 if dirty else 0


def _run_all(out: Path) -> int:
    import nbformat
    from nbclient.exceptions import CellExecutionError

    out.mkdir(parents=True, exist_ok=True)
    for path in notebooks():
        started = time.monotonic()
        try:
            nb = execute(path)
        except CellExecutionError as exc:
            print(f"{path.name}: failed\n{exc}", file=sys.stderr)
            return 1
        nbformat.write(nb, out / path.name)
        print(f"{path.name}: {time.monotonic() - started:.0f} s -> {out / path.name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
