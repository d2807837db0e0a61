"""``python -m bench [--quick | --only SECTION] [--out PATH] [--json PATH]``: run the benchmarks, write the report.

Full run (``make bench``): in-process per-stage latency (history, retrieval, features, ranking) on
ML-1M and on synthetic 100k- and 1M-item catalogs; the serving sequence encoder (ONNX Runtime) vs PyTorch;
the 1M-item IVF retriever alone; feature sources side by side; batch requests; ``/invocations``
through multi-model-server on the host and in the container (sequential, concurrency 2 and 8);
PSS with 1, 2 and 4 workers; cold starts. Training ML-1M adds 15-20 minutes when the commit
changed (ML-100k a few more), writing the synthetic 1M-item catalog ~3 minutes when its writer
changed; all are cached.

The full run ends with issue 11's targets: the user-history group read by the container from the
local Feature Store on ML-100k (added latency, one call per batch, freshness of a recorded event,
the store refusing connections or hanging, recovery) and recording events at 1,000 a second.

Quick run (``make bench-quick``): in-process and host-sequential on a small synthetic model
(ML-100k's shape), batch requests and feature sources, with fewer requests; no fresh-history
section.

``--only fresh-history``: that section alone (a few minutes), reported to
``bench-results/BENCHMARKS-fresh-history.md`` unless ``--out`` says otherwise.

``--only serving-scale``: issue 13's grid of catalog size x user count (Amazon-shaped synthetic
models up to 10M users; ``--scale-items`` / ``--scale-users`` change it): size on disk, cold start,
PSS with 1, 2 and 4 workers, single-user latency. Writing the 10M-user models takes a few minutes
each the first time (cached, ~4 GB each); the measurements about 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
SECTIONS = ("fresh-history", "serving-scale")  # what --only runs alone: bench.suite.SECTIONS holds their plans


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced set (under a minute)")
    parser.add_argument("--only", choices=SECTIONS, help="one section alone")
    parser.add_argument("--out", type=Path,
                        help="the Markdown report (default: bench-results/BENCHMARKS.md; bench-results/"
                             "BENCHMARKS-<section>.md with --only; docs/benchmarks.md keeps the curated tables)")
    parser.add_argument("--json", type=Path, help="the raw figures (default: bench-results/bench-<time>.json)")
    parser.add_argument("--retrain", action="store_true", help="rebuild the cached models")
    parser.add_argument("--image", help="benchmark this prebuilt image instead of building one")
    parser.add_argument("--requests", type=int, default=2000, help="requests per latency measurement")
    parser.add_argument("--scale-items", type=_counts, metavar="N,N,...",
                        help="serving-scale catalog sizes (default 10k,100k,1M)")
    parser.add_argument("--scale-users", type=_counts, metavar="N,N,...",
                        help="serving-scale user counts (default 100k,1M,10M)")
    args = parser.parse_args(argv)
    if args.only and args.quick:
        parser.error("--only and --quick do not combine")
    default_out = Path("bench-results") / (f"BENCHMARKS-{args.only}.md" if args.only else "BENCHMARKS.md")
    out: Path = args.out or default_out

    # The image runs with OMP_NUM_THREADS=1; measure the same here and in the host servers we start.
    # Without it, numpy's BLAS threads turn a 10-user matrix product into tens of ms on busy cores.
    # It must be set before numpy is imported, hence the late imports below.
    pinned = not any(v in os.environ for v in BLAS_THREAD_VARIABLES)
    if pinned:
        os.environ["OMP_NUM_THREADS"] = "1"
    from bench import report, suite

    started = time.monotonic()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    variant = "-quick" if args.quick else f"-{args.only}" if args.only else ""
    json_path = args.json or Path("bench-results") / f"bench{variant}-{stamp}.json"
    from bench.serving_scale import count_label

    grid = "".join(f" --scale-{kind} {','.join(count_label(n) for n in counts)}"
                   for kind, counts in (("items", args.scale_items), ("users", args.scale_users)) if counts)
    results: dict[str, Any] = {
        "command": "python -m bench" + (" --quick" if args.quick else f" --only {args.only}" if args.only else "")
        + grid,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "json": str(json_path),
        "machine": report.machine(),
        "notes": ["OMP_NUM_THREADS=1 set by the bench for itself and the host servers, as the image sets it"]
        if pinned
        else [],
    }
    results["load_before"] = results["machine"]["load_avg"]
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    try:
        plan = suite.run_quick if args.quick else suite.SECTIONS[args.only] if args.only else suite.run_full
        plan(args, results, logs)
    except (RuntimeError, OSError) as exc:  # a server that will not start, a failed build: the reason, no traceback
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    results["load_after"] = report.machine()["load_avg"]
    results["duration_s"] = round(time.monotonic() - started, 1)
    results["targets"] = report.targets(results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.markdown(results), encoding="utf-8")
    print(f"[bench] wrote {out} and {json_path} in {results['duration_s']:.0f} s (logs in {logs})")
    for t in results["targets"]:
        print(f"  {'met' if t['met'] else 'NOT MET' if t['met'] is False else '-':8} {t['target']}: {t['measured']}")
    return 0


def _counts(text: str) -> list[int]:
    """``10k,100k,1M`` -> [10000, 100000, 1000000] (argparse reports the ValueError)."""
    from bench.serving_scale import parse_count

    try:
        return [parse_count(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
