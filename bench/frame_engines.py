"""``python -m bench.frame_engines``: pandas against polars and DuckDB on the pipeline's heaviest
data-frame steps, on the long-tail synthetic interactions.

The steps, each as the pipeline does it in pandas (its own functions) and the closest polars and
DuckDB formulation:

- ``dedupe``: the loader's "keep each (user, item)'s latest row" over string ids;
- ``split``: the leave-last-out position of each row from its user's end (sort by user, time);
- ``timeline``: the point-in-time features' per-item sort by time with a per-item running
  rating sum (:class:`training.ranker_features.Timeline`).

polars and DuckDB are timed on data already in their own format (a pipeline built on them would
load straight into it); the conversion from pandas is reported on its own line. Both are optional:
an engine that is not importable is skipped. Prints a Markdown table of median seconds.

    PYTHONPATH=code:. python -m bench.frame_engines --rows 3M
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

STEPS = ("dedupe", "split", "timeline")


def _median_seconds(work: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pandas_steps(frame: Any) -> dict[str, Callable[[], Any]]:
    import pandas as pd

    from training.datasets.dataset import validate_interactions
    from training.ranker_features import Timeline
    from training.split import leave_last_out
    from twostage_rec import schema

    raw = frame.set_axis(pd.RangeIndex(1, len(frame) + 1))
    return {
        "dedupe": lambda: validate_interactions(raw, "bench"),
        "split": lambda: leave_last_out(frame),
        "timeline": lambda: Timeline(frame, schema.ITEM_ID),
    }


def polars_steps(frame: Any) -> tuple[dict[str, Callable[[], Any]], float]:
    import polars as pl

    started = time.perf_counter()
    df = pl.from_pandas(frame.astype({"user_id": object, "item_id": object}))
    conversion = time.perf_counter() - started

    def dedupe() -> Any:
        return df.sort("timestamp", maintain_order=True).unique(["user_id", "item_id"], keep="last", maintain_order=True)

    def split() -> Any:
        tie = pl.struct("user_id", "item_id").hash(seed=0)
        ordered = df.with_columns(tie=tie).sort(["user_id", "timestamp", "tie"])
        return ordered.with_columns(from_end=pl.len().over("user_id") - pl.int_range(pl.len()).over("user_id") - 1)

    def timeline() -> Any:
        coded = df.select(pl.col("item_id").cast(pl.Categorical).to_physical().alias("code"), "timestamp", "rating")
        ordered = coded.sort(["code", "timestamp"], maintain_order=True)
        return ordered.with_columns(pl.col("rating").cast(pl.Float64).cum_sum().over("code").alias("cumulative"))

    return {"dedupe": dedupe, "split": split, "timeline": timeline}, conversion


def duckdb_steps(frame: Any) -> tuple[dict[str, Callable[[], Any]], float]:
    import duckdb

    connection = duckdb.connect()
    started = time.perf_counter()
    connection.register("source", frame.astype({"user_id": object, "item_id": object}))
    connection.execute("CREATE TABLE interactions AS SELECT * FROM source")
    conversion = time.perf_counter() - started

    def fetch(sql: str) -> Any:
        return connection.execute(sql).fetchnumpy()

    return {
        "dedupe": lambda: fetch(
            "SELECT * FROM interactions QUALIFY row_number() OVER "
            "(PARTITION BY user_id, item_id ORDER BY timestamp DESC) = 1"
        ),
        "split": lambda: fetch(
            "SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY timestamp DESC, hash(user_id, item_id)) - 1 "
            "AS from_end FROM interactions"
        ),
        "timeline": lambda: fetch(
            "SELECT item_id, timestamp, sum(rating::DOUBLE) OVER (PARTITION BY item_id ORDER BY timestamp "
            "ROWS UNBOUNDED PRECEDING) AS cumulative FROM interactions ORDER BY item_id, timestamp"
        ),
    }, conversion


def main(argv: Sequence[str] | None = None) -> int:
    from bench.training_scale import parse_size
    from training.datasets import generate_long_tail

    parser = argparse.ArgumentParser(prog="python -m bench.frame_engines", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="3M", help="interactions (default 3M)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    frame = generate_long_tail(parse_size(args.rows)).interactions
    results: dict[str, dict[str, float]] = {}
    conversions: dict[str, float] = {}
    results["pandas"] = {s: _median_seconds(w, args.repeats) for s, w in pandas_steps(frame).items()}
    for engine, build in (("polars", polars_steps), ("duckdb", duckdb_steps)):
        try:
            steps, conversions[engine] = build(frame)
        except ImportError:
            print(f"{engine}: not installed, skipped", file=sys.stderr)
            continue
        results[engine] = {s: _median_seconds(w, args.repeats) for s, w in steps.items()}
    engines = list(results)
    lines = [
        f"{len(frame):,} interactions, median of {args.repeats} (seconds)",
        "",
        "| step | " + " | ".join(engines) + " |",
        "|---|" + "---:|" * len(engines),
    ]
    lines += [f"| {s} | " + " | ".join(f"{results[e][s]:.2f}" for e in engines) + " |" for s in STEPS]
    lines.append("| (from pandas) | - | " + " | ".join(f"{conversions[e]:.2f}" for e in engines[1:]) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
