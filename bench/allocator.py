"""Serving's allocator setting (:mod:`twostage_rec.allocator`) against glibc's defaults, one model.

    python -m bench.allocator --model DIR [--users 2000] [--rounds 2]

Each setting runs in its own child process (mallopt changes a whole process and cannot be undone
to glibc's adaptive defaults), the two alternating ``--rounds`` times so that a change in the
machine's load hits both. Each child answers the same ``--users`` random users through the
handler in-process, one at a time and in batches of 100, and counts its page faults. Prints JSON:
per setting and batch size, per-user p50 and p99 (ms, the median over rounds) and page faults per
request, and per setting how much the process's anonymous memory grew over the requests (the heap
kept); and the p50 ratios, default over kept. Linux only (glibc, ``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

SIZES: Final = (1, 100)
SETTINGS: Final = {"glibc_defaults": "0", "kept_256mb": "256"}


def child(model_dir: Path, users: int) -> dict[str, Any]:
    """This process's numbers, with the allocator as ``MALLOC_KEEP_MB`` says."""
    from bench import inprocess
    from twostage_rec.artifact import load_artifact
    from twostage_rec.settings import Settings

    artifact = load_artifact(model_dir, verify_checksums=False)
    svc, _ = inprocess.service(artifact, Settings.from_env())
    loaded = _anonymous_bytes()
    out = inprocess.per_user_cost(svc, inprocess.random_users(artifact.user_ids, users, seed=0), SIZES)
    # Anonymous memory (heap, not the model's file-backed pages) after the requests over what the
    # process held once loaded: the free heap kept, and what the requests left in caches.
    out["anon_growth_mb"] = (_anonymous_bytes() - loaded) / 2**20
    return out


def _anonymous_bytes() -> int:
    """This process's resident anonymous memory (Linux's ``RssAnon``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no RssAnon in /proc/self/status: this benchmark needs Linux")


def compare(model_dir: Path, users: int, rounds: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SETTINGS}
    for _ in range(rounds):
        for name, keep in SETTINGS.items():
            env = {**os.environ, "MALLOC_KEEP_MB": keep}
            cmd = [sys.executable, "-m", "bench.allocator", "--model", str(model_dir), "--users", str(users), "--child"]
            runs[name].append(json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout))
    result: dict[str, Any] = {"model": str(model_dir), "users": users, "rounds": rounds}
    for name, per_round in runs.items():
        result[name] = {
            size: {key: statistics.median(r[size][key] for r in per_round) for key in per_round[0][size]}
            for size in map(str, SIZES)
        }
        result[name]["anon_growth_mb"] = statistics.median(r["anon_growth_mb"] for r in per_round)
    result["p50_ratio_defaults_over_kept"] = {
        size: result["glibc_defaults"][size]["per_user_p50_ms"] / result["kept_256mb"][size]["per_user_p50_ms"]
        for size in map(str, SIZES)
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.allocator", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model folder (e.g. out/model)")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    result = child(args.model, args.users) if args.child else compare(args.model, args.users, args.rounds)
    print(json.dumps(result, indent=None if args.child else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
