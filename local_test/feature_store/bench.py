"""Benchmark: boto3 ``batch_get_record`` of 100 ids against the local Feature Store over loopback.

    python -m local_test.feature_store.bench [--endpoint-url URL] [--calls 500]

Without ``--endpoint-url`` it starts its own server (a subprocess with a temporary database).
The time measured is the whole client call: signing, HTTP, the server, and botocore's parsing.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
import uuid
from collections.abc import Sequence
from typing import Any

from local_test.feature_store.testing import FeatureStoreServer, make_clients

FEATURES = {  # ~8 item features, named like the project's shared schema
    "item_id": "String", "event_time": "Fractional", "price": "Fractional", "category": "String",
    "avg_rating": "Fractional", "rating_count": "Integral", "year": "Integral", "title": "String",
}


def _record(index: int, rng: random.Random) -> list[dict[str, str]]:
    values = {
        "item_id": f"item-{index:05d}", "event_time": f"{time.time():.3f}", "price": f"{rng.uniform(1, 100):.2f}",
        "category": rng.choice(["Books", "Movies", "Music", "Games"]), "avg_rating": f"{rng.uniform(1, 5):.3f}",
        "rating_count": str(rng.randint(0, 5000)), "year": str(rng.randint(1950, 2024)),
        "title": f"Title number {index}",
    }
    return [{"FeatureName": name, "ValueAsString": value} for name, value in values.items()]


def _timed_calls(runtime: Any, group: str, item_ids: list[str], calls: int, warmup: int,
                 rng: random.Random, feature_names: list[str] | None = None) -> list[float]:
    millis = []
    for i in range(warmup + calls):
        identifier: dict[str, Any] = {"FeatureGroupName": group,
                                      "RecordIdentifiersValueAsString": rng.sample(item_ids, 100)}
        if feature_names:
            identifier["FeatureNames"] = feature_names
        start = time.perf_counter()
        response = runtime.batch_get_record(Identifiers=[identifier])
        elapsed = (time.perf_counter() - start) * 1000.0
        if len(response["Records"]) != 100:
            raise RuntimeError(f"expected 100 records, got {len(response['Records'])}")
        if i >= warmup:
            millis.append(elapsed)
    return millis


def latency_summary(label: str, millis: list[float], unit: str = "calls") -> str:
    """``label: p50 .. ms  p99 .. ms  (n calls)`` of latencies in milliseconds."""
    p99 = statistics.quantiles(millis, n=100)[98]
    return f"{label}: p50 {statistics.median(millis):.2f} ms  p99 {p99:.2f} ms  ({len(millis)} {unit})"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print p50/p99 in milliseconds."""
    parser = argparse.ArgumentParser(prog="python -m local_test.feature_store.bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint-url", help="an already running local Feature Store (default: start one)")
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.records < 100:
        parser.error("--records must be at least 100 (each call asks for 100 distinct ids)")

    with contextlib.ExitStack() as stack:
        endpoint_url = args.endpoint_url or stack.enter_context(FeatureStoreServer()).endpoint_url
        sagemaker, runtime = make_clients(endpoint_url)
        group = f"bench-items-{uuid.uuid4().hex[:8]}"
        sagemaker.create_feature_group(
            FeatureGroupName=group, RecordIdentifierFeatureName="item_id", EventTimeFeatureName="event_time",
            FeatureDefinitions=[{"FeatureName": n, "FeatureType": t} for n, t in FEATURES.items()],
            OnlineStoreConfig={"EnableOnlineStore": True},
        )
        stack.callback(sagemaker.delete_feature_group, FeatureGroupName=group)
        rng = random.Random(args.seed)
        start = time.perf_counter()
        for index in range(args.records):
            runtime.put_record(FeatureGroupName=group, Record=_record(index, rng))
        put_ms = (time.perf_counter() - start) * 1000.0 / args.records
        item_ids = [f"item-{index:05d}" for index in range(args.records)]

        print(f"endpoint {endpoint_url}; put_record of {len(FEATURES)} features: "
              f"mean {put_ms:.2f} ms ({args.records} records)")
        all_features = _timed_calls(runtime, group, item_ids, args.calls, args.warmup, rng)
        print(latency_summary("batch_get_record 100 ids, all features", all_features))
        subset = ["price", "avg_rating", "rating_count", "year"]
        print(latency_summary(f"batch_get_record 100 ids, FeatureNames={subset}",
                              _timed_calls(runtime, group, item_ids, args.calls, args.warmup, rng, subset)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
