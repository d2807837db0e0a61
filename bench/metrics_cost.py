"""What the request metrics add to a request: ``python -m bench.metrics_cost``.

    python -m bench.metrics_cost [--model DIR] [--requests 4000] [--calls 100000]

One run, in this process, on the quick synthetic model (ML-100k's shape; ``--model`` for another):

1. ``hook``: :meth:`RequestMetrics.record_answers` alone on a real answer, ``--calls`` timed calls,
   with the writer thread running and writing its EMF lines to /dev/null, as in a worker (a window
   closes every 100 requests here: the writer's serialization competes for the GIL as under load).
2. ``handler``: ``predict_fn`` + ``output_fn`` per request, with and without the hook, each body
   both ways one right after the other (which way first alternates), so that the machine's load
   hits both alike: the two summaries, the median of the per-body differences, and for scale the
   median difference between whichever ran first and second (order and noise alone). On a busy
   machine all are noise-bound (a request takes a millisecond or more), hence the first measurement.
3. ``library``: the same metrics through aws-embedded-metrics, when it is installed (it is not a
   dependency: ``pip install --target DIR aws-embedded-metrics==3.5.0`` and ``PYTHONPATH=DIR``):
   nine ``put_metric`` calls per request into one logger, ``flush`` every 100 requests on one
   event loop (its flush is a coroutine), stdout to /dev/null.

Prints JSON: medians and p99 in microseconds, and whether the hook's p99 meets the target of
0.05 ms added per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

TARGET_US: Final = 50.0  # issue 25: at most 0.05 ms added per request
WINDOW_S: Final = 10.0  # the default METRICS_WINDOW_S
LIBRARY_VERSION: Final = "3.5.0"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model directory (default: the quick synthetic model)")
    parser.add_argument("--requests", type=int, default=4000, help="handler requests, each way")
    parser.add_argument("--calls", type=int, default=100_000, help="timed calls of the hook alone")
    args = parser.parse_args(argv)
    # As in the image (see bench.__main__): one BLAS thread, set before numpy is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(json.dumps(measure(args.model, args.requests, args.calls), indent=1))
    return 0


def measure(model_dir: Path | None, n_requests: int, calls: int) -> dict[str, Any]:
    """The three measurements of the module docstring, in one run."""
    from bench import inprocess, models, suite
    from twostage_rec.artifact import load_artifact
    from twostage_rec.content_types import JSON
    from twostage_rec.handler import RawRequest, output_fn, predict_fn

    command = "python -m bench.metrics_cost" + (f" --model {model_dir}" if model_dir else "")
    model_dir = model_dir or models.synthetic_model(suite.QUICK_ITEMS, suite.QUICK_USERS)
    artifact = load_artifact(model_dir, verify_checksums=False)
    svc, _ = inprocess.service(artifact)
    bodies = [inprocess.single_body(u) for u in inprocess.random_users(artifact.user_ids, n_requests, seed=0)]
    answers = predict_fn(RawRequest(bodies[0]), svc).answers
    with open(os.devnull, "w", encoding="utf-8") as devnull:
        metrics = _metrics(svc, devnull)
        hook = _time_each(lambda: metrics.record_answers(answers), calls)
        metrics.close()

        metrics = _metrics(svc, devnull)
        arms: dict[str, Callable[[Sequence[Any]], None]] = {
            "without_metrics": lambda _answers: None,  # also the control: the same call, doing nothing
            "with_metrics": metrics.record_answers,
        }
        times: dict[str, list[float]] = {"without_metrics": [], "with_metrics": []}
        for body in bodies[: inprocess.WARMUP]:
            metrics.record_answers(predict_fn(RawRequest(body), svc).answers)
        for i, body in enumerate(bodies):
            order = list(arms) if i % 2 == 0 else list(reversed(arms))  # each way first every other body
            for arm in order:
                started = time.perf_counter()
                prediction = predict_fn(RawRequest(body), svc)
                output_fn(prediction, JSON)
                arms[arm](prediction.answers)
                times[arm].append(time.perf_counter() - started)
        metrics.close()
        library = _library(answers, calls, devnull)

    without, with_hook = _summary(times["without_metrics"]), _summary(times["with_metrics"])
    # The same body both ways, one right after the other; for scale, the same difference between
    # whichever ran first and second, which is all order and noise.
    paired = _median([h - p for h, p in zip(times["with_metrics"], times["without_metrics"])])
    order = _median([(h - p) * (-1 if i % 2 == 0 else 1)  # even bodies ran without metrics first
                     for i, (h, p) in enumerate(zip(times["with_metrics"], times["without_metrics"]))])
    return {
        "command": f"{command} --requests {n_requests} --calls {calls}",
        "model": artifact.manifest.model_version,
        "hook_us": hook,
        "handler_us": {"without_metrics": without, "with_metrics": with_hook,
                       "p50_difference": round(with_hook["p50"] - without["p50"], 2),
                       "p99_difference": round(with_hook["p99"] - without["p99"], 2),
                       "paired_difference_median": round(paired * 1e6, 2),
                       "first_minus_second_median": round(order * 1e6, 2)},
        "library_us": library,
        "target": {"added_per_request_us": TARGET_US, "hook_p99_us": hook["p99"], "met": hook["p99"] <= TARGET_US},
    }


def _metrics(svc: Any, out: Any) -> Any:
    from twostage_rec.request_metrics import RequestMetrics

    def write_line(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    return RequestMetrics(svc.settings.metrics_namespace, svc.recommender.model_version, WINDOW_S,
                          breakers=svc.recommender.breakers, write_line=write_line)


def _library(answers: Sequence[Any], calls: int, out: Any) -> dict[str, Any]:
    """aws-embedded-metrics' cost for the same numbers, or why it was not measured."""
    os.environ["AWS_EMF_ENVIRONMENT"] = "Local"  # stdout, no probing of EC2's metadata service
    try:
        from aws_embedded_metrics.logger.metrics_logger_factory import create_metrics_logger
    except ImportError:
        install = f"pip install aws-embedded-metrics=={LIBRARY_VERSION}"
        return {"measured": False, "reason": f"aws-embedded-metrics is not installed ({install})"}
    timings = answers[0].timings_ms
    logger = create_metrics_logger()
    logger.set_namespace("TwoStageRec")
    logger.set_dimensions({"ModelVersion": "bench"})
    logger.flush_preserve_dimensions = True
    loop = asyncio.new_event_loop()
    count = [0]

    def record() -> None:
        for stage in ("history", "retrieval", "features", "ranking", "total"):
            logger.put_metric(f"{stage.capitalize()}Latency", timings[stage], "Milliseconds")
        logger.put_metric("Requests", 1, "Count")
        logger.put_metric("UsersAnswered", len(answers), "Count")
        logger.put_metric("FallbackAnswers", sum(a.fallback is not None for a in answers), "Count")
        logger.put_metric("DegradedAnswers", sum(a.degraded for a in answers), "Count")
        count[0] += 1
        if count[0] % 100 == 0:  # the request that ends a window writes it: the library has no thread
            loop.run_until_complete(logger.flush())

    try:
        with contextlib.redirect_stdout(out):
            timed = _time_each(record, calls)
    finally:
        loop.close()
    import aws_embedded_metrics

    return {"measured": True, "version": getattr(aws_embedded_metrics, "__version__", LIBRARY_VERSION), **timed}


def _time_each(fn: Callable[[], object], calls: int) -> dict[str, Any]:
    for _ in range(min(1000, calls)):
        fn()
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return {"calls": calls, **_summary(samples)}


def _median(values: Sequence[float]) -> float:
    return sorted(values)[len(values) // 2]


def _summary(seconds: Sequence[float]) -> dict[str, float]:
    from bench.stats import summarize

    s = summarize([v * 1e6 for v in seconds])  # microseconds, though summarize speaks of ms
    return {"p50": round(s.p50, 2), "p90": round(s.p90, 2), "p99": round(s.p99, 2), "mean": round(s.mean, 2)}


if __name__ == "__main__":
    sys.exit(main())
