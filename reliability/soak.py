"""Sustained load: ``python -m reliability.soak --minutes 10 --concurrency 8``.

Serves a model in Docker when an engine answers (else with ``serve`` on the host), sends a fixed
mix of calls from ``concurrency`` keep-alive clients for ``minutes``, and samples the memory of
every serving process. Writes ``timeline.csv`` (one row per sample) and ``summary.json`` into
``--out`` and exits non-zero if any call failed or memory (PSS of every serving process) grew more
than ``--max-growth-mb`` after ``--warm-up-s`` (multi-model-server's JVM grows its heap for the
first tens of seconds under load, then plateaus).

The mix (seeded, so every run sends the same calls): 70% one known user, 10% an unknown user
(popularity fallback), 10% a batch of 10 users, 5% filters and exclusions, 5% malformed bodies
that must be answered 400. A call fails when its status is not the expected one, or when no HTTP
answer comes at all.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from reliability.load import Call, Load, Outcome, Summary, summarize
from reliability.targets import REPO, DockerServe, HostServe, Target, TargetError, docker_available, memory

DEFAULT_IMAGE = "twostage-rec:latest"
MALFORMED = [b"{", b'{"user_id": 5}', b'{"user_id": "x", "top_k": 0}', b"[]"]


@dataclass(frozen=True)
class Sample:
    """One row of the timeline: the calls completed in the interval and the memory at its end."""

    elapsed_s: float
    calls: int
    failed: int
    p50_ms: float
    p99_ms: float
    rss_mb: float
    pss_mb: float
    java_pss_mb: float
    python_pss_mb: float
    processes: int


@dataclass(frozen=True)
class SoakReport:
    target: str
    duration_s: float
    concurrency: int
    warm_up_s: float  # growth is measured from the first sample after this (the JVM heap settles)
    summary: Summary
    samples: list[Sample]

    @property
    def baseline(self) -> Sample:
        return next((s for s in self.samples if s.elapsed_s >= self.warm_up_s), self.samples[-1])

    def growth_mb(self, column: str = "pss_mb") -> float:
        """``column`` at the end minus at the baseline."""
        return float(getattr(self.samples[-1], column) - getattr(self.baseline, column))

    def slope_mb_per_hour(self, column: str = "pss_mb") -> float:
        """Least-squares trend of ``column`` after the warm-up: a leak shows as a steady slope."""
        points = [(s.elapsed_s, getattr(s, column)) for s in self.samples if s.elapsed_s >= self.warm_up_s]
        if len(points) < 2:
            return 0.0
        mean_t = sum(t for t, _ in points) / len(points)
        mean_v = sum(v for _, v in points) / len(points)
        var = sum((t - mean_t) ** 2 for t, _ in points)
        return 3600.0 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var if var else 0.0

    @property
    def throughput_rps(self) -> float:
        return self.summary.calls / self.duration_s if self.duration_s else 0.0

    def memory_line(self) -> str:
        first, base, last = self.samples[0], self.baseline, self.samples[-1]
        return (f"PSS {first.pss_mb:.0f} MB at {first.elapsed_s:.0f} s, {base.pss_mb:.0f} MB at "
                f"{base.elapsed_s:.0f} s, {last.pss_mb:.0f} MB at {last.elapsed_s:.0f} s: "
                f"{self.growth_mb():+.1f} MB after the warm-up "
                f"(java {self.growth_mb('java_pss_mb'):+.1f}, python {self.growth_mb('python_pss_mb'):+.1f}), "
                f"trend {self.slope_mb_per_hour():+.1f} MB/h")


def call_mix(user_ids: Sequence[str], item_ids: Sequence[str], n: int = 1000, seed: int = 0) -> list[Call]:
    """The seeded mix of calls described in the module docstring."""
    rng = random.Random(seed)
    calls = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.70:
            body: object = {"user_id": rng.choice(user_ids), "top_k": 10}
        elif roll < 0.80:
            body = {"user_id": f"unknown-{i}", "top_k": 10}
        elif roll < 0.90:
            batch = rng.sample(list(user_ids), min(10, len(user_ids)))
            body = {"instances": [{"user_id": u, "top_k": 5} for u in batch]}
        elif roll < 0.95:
            body = {
                "user_id": rng.choice(user_ids),
                "exclude_items": rng.sample(list(item_ids), min(3, len(item_ids))),
                "filters": {"min_price": 0, "max_price": 1e9},
            }
        else:
            calls.append(Call(rng.choice(MALFORMED), expect=400))
            continue
        calls.append(Call(json.dumps(body).encode()))
    return calls


def soak(target: Target, calls: Sequence[Call], duration_s: float, concurrency: int, sample_s: float,
         warm_up_s: float = 60.0) -> SoakReport:
    """Run the load for ``duration_s`` and sample memory every ``sample_s``."""
    samples: list[Sample] = []
    started = time.monotonic()
    seen = 0
    with Load(target.host, target.port, calls, concurrency) as load:
        while (now := time.monotonic()) - started < duration_s:
            time.sleep(min(sample_s, max(0.0, duration_s - (now - started))))
            outcomes = load.outcomes()
            samples.append(_sample(time.monotonic() - started, outcomes[seen:], target))
            seen = len(outcomes)
    # The summary also counts the calls that were in flight when the clock ran out.
    elapsed = time.monotonic() - started
    return SoakReport(target.label, elapsed, concurrency, warm_up_s, summarize(load.outcomes()), samples)


def _sample(elapsed_s: float, interval: Sequence[Outcome], target: Target) -> Sample:
    s = summarize(interval)
    m = memory(target.pids())
    return Sample(round(elapsed_s, 1), s.calls, s.failed, round(s.p50_ms, 2), round(s.p99_ms, 2), round(m.rss_mb, 1),
                  round(m.pss_mb, 1), round(m.java_pss_mb, 1), round(m.python_pss_mb, 1), m.processes)


def write_report(report: SoakReport, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "timeline.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(Sample.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(s) for s in report.samples)
    body = {
        "target": report.target,
        "duration_s": round(report.duration_s, 1),
        "concurrency": report.concurrency,
        "throughput_rps": round(report.throughput_rps, 1),
        "summary": asdict(report.summary),
        "warm_up_s": report.warm_up_s,
        "memory_mb": {kind: {"first": getattr(report.samples[0], kind), "baseline": getattr(report.baseline, kind),
                             "last": getattr(report.samples[-1], kind), "growth": round(report.growth_mb(kind), 1),
                             "trend_per_hour": round(report.slope_mb_per_hour(kind), 1)}
                      for kind in ("pss_mb", "rss_mb", "java_pss_mb", "python_pss_mb")},
    }
    (out_dir / "summary.json").write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", type=Path, default=REPO / "out" / "model",
                        help="model directory (default out/model; the tiny test model if that is absent)")
    parser.add_argument("--target", choices=["auto", "container", "host"], default="auto",
                        help="auto: the container when a Docker engine answers, else the host")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"image for the container target ({DEFAULT_IMAGE})")
    parser.add_argument("--workers", type=int, default=2, help="SAGEMAKER_MODEL_SERVER_WORKERS")
    parser.add_argument("--cpus", type=float, default=None, help="docker --cpus for the container target")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--warm-up-s", type=float, default=60.0, help="memory growth is measured after this")
    parser.add_argument("--max-growth-mb", type=float, default=64.0,
                        help="fail if PSS grows more than this after the warm-up")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/soak-<UTC time>)")
    args = parser.parse_args(argv)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or REPO / "runs" / f"soak-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model if (args.model / "model_manifest.json").is_file() else _tiny_model(out_dir)
    kind = args.target if args.target != "auto" else ("container" if docker_available() else "host")
    print(f"soak: {args.minutes:g} min at concurrency {args.concurrency} against the {kind} serving {model_dir}")
    try:
        target: Target = (
            DockerServe(args.image, model_dir, out_dir, args.workers, args.cpus)
            if kind == "container"
            else HostServe(model_dir, out_dir, args.workers)
        )
    except TargetError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    try:
        from twostage_rec.artifact import load_ids

        user_ids, item_ids = list(load_ids(model_dir, "user")), list(load_ids(model_dir, "item"))
        report = soak(target, call_mix(user_ids, item_ids), args.minutes * 60, args.concurrency, args.sample_s,
                      args.warm_up_s)
    finally:
        exit_status = target.stop()
    write_report(report, out_dir)
    s = report.summary
    print(f"soak: {s.line()}")
    print(f"soak: {report.throughput_rps:.0f} calls/s; {report.memory_line()}; server exit status {exit_status}")
    print(f"soak: wrote {out_dir / 'timeline.csv'} and {out_dir / 'summary.json'}")
    if s.failed or report.growth_mb() > args.max_growth_mb:
        print(f"soak: FAILED ({s.failed} failed calls, PSS growth {report.growth_mb():+.1f} MB after the warm-up, "
              f"bound {args.max_growth_mb:g} MB)", file=sys.stderr)
        return 1
    return 0


def _tiny_model(out_dir: Path) -> Path:
    """The 3-user test model, when no trained model is at hand (the soak then tests the server, not the model)."""
    sys.path.insert(0, str(REPO / "code"))
    from tests.support.tiny_model import build_tiny_model

    return build_tiny_model(Path(tempfile.mkdtemp(prefix="model-", dir=out_dir)) / "model")


if __name__ == "__main__":
    sys.exit(main())
