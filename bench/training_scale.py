"""``python -m bench.training_scale``: how the training pipeline's cost grows with the data.

Runs ``python -m training run`` in a fresh subprocess on synthetic data in the Amazon-reviews shape
(``--n-interactions``: many users with a few interactions each, a long tail of items; users and
items grow in proportion to the interactions) at each size, reads every stage's wall time and
peak resident memory from metrics.json (``timings_s``, ``memory_mb``), fits each stage's growth
exponent ``b`` of ``cost ~ a * n ** b`` (least squares on log-log) and writes a Markdown section.

Fixed small epoch counts (``--epochs``, ``--sequence-epochs``) make the sizes comparable: growth
is then per epoch, not a mix of per-epoch cost and how early validation happened to stop. EASE
and Surprise SVD are off (``--no-baselines``: they are only compared against, and EASE's dense
item-item inverse is quadratic in the catalog by design), as are the ablations (the same stages
retrained a few more times). Anything after ``--`` goes to ``python -m training run`` as is.

    python -m bench.training_scale --sizes 1M,3M,10M

``--catalog N`` runs the media shape instead (the fixed-per-user generator: 30 interactions a
user over a catalog of N items, so more interactions mean more users of the same kind), and
``--report`` keeps EASE, SVD and the ablations, within the report's budget
(``training/report_budget.py``):

    python -m bench.training_scale --sizes 1M,3M --catalog 20000 --report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SIZES = (1_000_000, 3_000_000, 10_000_000)
TARGET_EXPONENT = 1.15
TARGET_TOTAL_S = 30 * 60.0  # at the largest default size
# Stages shorter than this at the largest size are listed but not judged: their exponent is
# mostly the noise of a shared machine.
MIN_JUDGED_S = 2.0
DEFAULT_OUT = Path("bench-results") / "BENCHMARKS-training-scale.md"
_SUFFIXES = {"k": 1_000, "m": 1_000_000}
PER_USER = 30  # generate_synthetic's interactions per user: the media shape of --catalog


@dataclass(frozen=True)
class ScaleRun:
    """One pipeline run: its size and each stage's seconds and peak memory (MB)."""

    n_interactions: int
    n_users: int
    n_items: int
    seconds: dict[str, float]
    memory_mb: dict[str, float]
    wall_s: float  # the whole subprocess, imports and writing included
    peak_mb: float  # the subprocess's peak RSS over the whole run
    mf_best_epoch: int = 0
    ranker_queries: int = 0
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # empty from runs before cpu_s existed

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any], wall_s: float, peak_mb: float) -> ScaleRun:
        """``peak_mb`` is the child's ``ru_maxrss``; each stage resets that high-water mark to take
        its own peak, so the run's peak is the larger of it and every stage's."""
        stage_peaks = [float(v) for v in metrics.get("memory_mb", {}).values()]
        return cls(
            n_interactions=int(metrics["n_interactions"]),
            n_users=int(metrics["n_users"]),
            n_items=int(metrics["n_items"]),
            seconds={k: float(v) for k, v in metrics.get("timings_s", {}).items()},
            memory_mb={k: float(v) for k, v in metrics.get("memory_mb", {}).items()},
            wall_s=wall_s,
            peak_mb=max([peak_mb, *stage_peaks]),
            mf_best_epoch=int(metrics.get("tuning", {}).get("mf", {}).get("best_epoch", 0)),
            ranker_queries=int(metrics.get("ranker", {}).get("training_queries", 0)),
            cpu_seconds={k: float(v) for k, v in metrics.get("cpu_s", {}).items()},
        )


def parse_size(text: str) -> int:
    """``"3M"`` -> 3000000, ``"300k"`` -> 300000, ``"1.5M"`` -> 1500000, ``"2000"`` -> 2000."""
    text = text.strip().lower()
    scale = _SUFFIXES.get(text[-1:], 1)
    number = float(text[:-1] if text[-1:] in _SUFFIXES else text)
    value = round(number * scale)
    if value < 1:
        raise ValueError(f"size {text!r} must be at least 1")
    return value


def growth_exponent(sizes: Sequence[float], values: Sequence[float]) -> float:
    """Slope ``b`` of the least-squares line through ``(log size, log value)``: cost ~ size ** b.

    NaN with fewer than two distinct sizes or any value <= 0 (no logarithm).
    """
    if len(sizes) != len(values):
        raise ValueError(f"{len(sizes)} sizes but {len(values)} values")
    if len(set(sizes)) < 2 or any(v <= 0 for v in values) or any(s <= 0 for s in sizes):
        return math.nan
    xs = [math.log(s) for s in sizes]
    ys = [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def _stages(runs: Sequence[ScaleRun]) -> list[str]:
    """Stages every run measured, in pipeline order."""
    first = list(runs[0].seconds)
    return [s for s in first if all(s in r.seconds for r in runs)]


def _verdict(exponent: float, judged: bool) -> str:
    if not judged:
        return f"not judged (< {MIN_JUDGED_S:g} s)"
    if math.isnan(exponent):
        return "n/a"
    return "met" if exponent <= TARGET_EXPONENT else "**missed**"


def _size_label(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:.3g}M"
    if n >= 1_000:
        return f"{n / 1_000:.3g}k"
    return str(n)


def markdown_section(runs: Sequence[ScaleRun], command: str, heading: str = "## Training at scale") -> str:
    """The report: per size the stages' seconds and peak MB, per stage the exponents and verdicts,
    and the total against the 30-minute target."""
    runs = sorted(runs, key=lambda r: r.n_interactions)
    stages = _stages(runs)
    sizes = [r.n_interactions for r in runs]
    lines = [heading, "", f"`{command}`", ""]
    lines.append("| interactions | users | items | " + " | ".join(stages) + " | sum of stages | whole run | peak RSS |")
    lines.append("|" + "---:|" * (len(stages) + 6))
    for r in runs:
        cells = [f"{r.seconds[s]:.1f} s / {r.memory_mb.get(s, math.nan):,.0f} MB" for s in stages]
        lines.append(
            f"| {r.n_interactions:,} | {r.n_users:,} | {r.n_items:,} | "
            + " | ".join(cells)
            + f" | {sum(r.seconds[s] for s in stages):.1f} s | {r.wall_s:.1f} s | {r.peak_mb:,.0f} MB |"
        )
    lines += [
        "",
        "Each stage cell: wall time / peak resident memory during the stage (the whole process's, so it "
        "includes the data every stage holds). MF's validated epoch, which the two refits repeat: "
        + ", ".join(str(r.mf_best_epoch) for r in runs)
        + "; ranker-period queries: "
        + ", ".join(f"{r.ranker_queries:,}" for r in runs)
        + ".",
        "",
    ]
    lines.append(
        f"Growth exponent `b` of `cost ~ n ** b` over {', '.join(_size_label(s) for s in sizes)} "
        f"interactions (least squares on log-log); target b <= {TARGET_EXPONENT}:"
    )
    with_cpu = all(all(s in r.cpu_seconds for s in stages) for r in runs)
    if with_cpu:
        lines += [
            "",
            "CPU seconds per stage (all threads; other processes on the shared cores stretch wall time, "
            "not CPU time): "
            + "; ".join(
                f"{_size_label(r.n_interactions)}: " + ", ".join(f"{s} {r.cpu_seconds[s]:.0f}" for s in stages)
                for r in runs
            )
            + ".",
        ]
    lines += ["", "| stage | time b | time | memory b | memory |" + (" CPU time b |" if with_cpu else "")]
    lines.append("|---|---:|---|---:|---|" + ("---:|" if with_cpu else ""))
    met_all, fitted = True, 0
    for stage in stages + ["(sum of stages)", "(whole run)"]:
        if stage == "(sum of stages)":
            times = [sum(r.seconds[s] for s in stages) for r in runs]
            memory = [max(r.memory_mb.get(s, 0.0) for s in stages) for r in runs]
        elif stage == "(whole run)":
            times, memory = [r.wall_s for r in runs], [r.peak_mb for r in runs]
        else:
            times = [r.seconds[stage] for r in runs]
            memory = [r.memory_mb.get(stage, 0.0) for r in runs]
        judged = times[-1] >= MIN_JUDGED_S
        time_b, memory_b = growth_exponent(sizes, times), growth_exponent(sizes, memory)
        time_verdict, memory_verdict = _verdict(time_b, judged), _verdict(memory_b, judged)
        met_all &= "missed" not in time_verdict + memory_verdict
        fitted += judged and not (math.isnan(time_b) and math.isnan(memory_b))
        row = f"| {stage} | {time_b:.2f} | {time_verdict} | {memory_b:.2f} | {memory_verdict} |"
        if with_cpu:
            if stage == "(sum of stages)":
                cpu = [sum(r.cpu_seconds[s] for s in stages) for r in runs]
            elif stage == "(whole run)":
                cpu = [math.nan for _ in runs]
            else:
                cpu = [r.cpu_seconds[stage] for r in runs]
            row += f" {growth_exponent(sizes, cpu) if not math.isnan(cpu[0]) else math.nan:.2f} |"
        lines.append(row)
    largest = runs[-1]
    within = largest.wall_s <= TARGET_TOTAL_S
    lines += [
        "",
        f"Exponent target (b <= {TARGET_EXPONENT} for time and memory of every judged stage): "
        + (
            "**not measured** (an exponent needs two sizes or more)."
            if not fitted
            else "**met**." if met_all else "**missed** (see the table)."
        ),
        f"Total at {largest.n_interactions:,} interactions: {largest.wall_s / 60:.1f} min, "
        + ("within" if within else "**over**")
        + f" the {TARGET_TOTAL_S / 60:.0f}-minute target"
        + (
            ""
            if largest.n_interactions >= DEFAULT_SIZES[-1]
            else f" (measured at {_size_label(largest.n_interactions)}, not {_size_label(DEFAULT_SIZES[-1])})"
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def synthetic_arguments(n_interactions: int, catalog: int | None = None) -> list[str]:
    """``training run``'s data options: the long-tail shape of ``n_interactions``, or with a
    ``catalog`` the media shape, ``ceil(n / 30)`` users of 30 interactions over ``catalog`` items
    (1M: 33,334 users, 1,000,020 interactions)."""
    if catalog is None:
        return ["--n-interactions", str(n_interactions)]
    return ["--n-users", str(math.ceil(n_interactions / PER_USER)), "--n-items", str(catalog)]


def run_size(
    n_interactions: int, out_dir: Path, pipeline_args: Sequence[str], log: Path, catalog: int | None = None
) -> ScaleRun:
    """One ``python -m training run`` in a fresh process; its metrics, wall time and peak RSS."""
    command = [
        sys.executable,
        "-m",
        "training",
        "run",
        "--dataset",
        "synthetic",
        *synthetic_arguments(n_interactions, catalog),
        "--out",
        str(out_dir),
        *pipeline_args,
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all children).
        _, status, usage = os.wait4(process.pid, 0)
    wall_s = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited {code}; see {log}")
    metrics = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    return ScaleRun.from_metrics(metrics, wall_s, usage.ru_maxrss / 1024)  # ru_maxrss is in kB on Linux


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training_scale", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default=",".join(_size_label(s) for s in DEFAULT_SIZES),
        help="interaction counts, comma-separated, e.g. 1M,3M,10M or 100k,300k (default 1M,3M,10M)",
    )
    parser.add_argument("--epochs", type=int, default=3, help="MF epochs (upper bound of early stopping; default 3)")
    parser.add_argument(
        "--sequence-epochs",
        type=int,
        default=2,
        help="sequence model epochs before the ranker period (default 2; up to 2 more follow on the whole train split)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: one per core)")
    parser.add_argument(
        "--catalog",
        type=int,
        default=None,
        metavar="N",
        help=f"the media shape: {PER_USER} interactions a user over N items (default: the long-tail shape)",
    )
    parser.add_argument(
        "--report", action="store_true", help="keep EASE, SVD and the ablations (within the report's budget)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("bench-results") / "training-scale",
        help="where each size's run writes its model and logs",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the Markdown section (default {DEFAULT_OUT})")
    parser.add_argument("--json", type=Path, help="the raw figures (default: next to --out)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read a size's metrics.json from --work when it is there instead of training again "
        "(its whole-run time is then the sum of its stages, its peak the largest stage peak)",
    )
    args, rest = parser.parse_known_args(argv)
    extra = rest[1:] if rest[:1] == ["--"] else rest
    sizes = sorted(parse_size(s) for s in args.sizes.split(",") if s.strip())
    pipeline_args = [] if args.report else ["--no-baselines", "--no-ablations"]
    pipeline_args += [
        "--no-progress",
        "--epochs",
        str(args.epochs),
        "--sequence-epochs",
        str(args.sequence_epochs),
    ]
    if args.threads:
        pipeline_args += ["--threads", str(args.threads)]
    pipeline_args += extra
    runs = []
    for size in sizes:
        label = _size_label(size)
        print(f"training on {label} interactions ...", file=sys.stderr, flush=True)
        done = args.work / label / "metrics.json"
        if args.reuse and done.exists():
            metrics = json.loads(done.read_text(encoding="utf-8"))
            run = ScaleRun.from_metrics(
                metrics, sum(metrics["timings_s"].values()), max(metrics.get("memory_mb", {}).values(), default=0.0)
            )
        else:
            run = run_size(size, args.work / label, pipeline_args, args.work / f"{label}.log", args.catalog)
        print(f"  {label}: {run.wall_s:.0f} s, peak {run.peak_mb:,.0f} MB", file=sys.stderr, flush=True)
        runs.append(run)
        # Written after every size: a long run stopped at the largest size keeps the smaller ones.
        section = _write_report(runs, sizes, args, extra)
    print(section)
    return 0


def _write_report(
    runs: Sequence[ScaleRun], sizes: Sequence[int], args: argparse.Namespace, extra: Sequence[str]
) -> str:
    command = "python -m bench.training_scale --sizes " + ",".join(_size_label(s) for s in sizes)
    command += f" --epochs {args.epochs} --sequence-epochs {args.sequence_epochs}"
    command += f" --threads {args.threads}" if args.threads else ""
    command += (f" --catalog {args.catalog}" if args.catalog else "") + (" --report" if args.report else "")
    command += " -- " + " ".join(extra) if extra else ""
    section = markdown_section(runs, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(section, encoding="utf-8")
    raw = args.json or args.out.with_suffix(".json")
    raw.write_text(json.dumps([r.__dict__ for r in runs], indent=2) + "\n", encoding="utf-8")
    return section


if __name__ == "__main__":
    sys.exit(main())
