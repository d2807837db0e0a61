"""Every user's top 10 through a Batch Transform in the SageMaker Python SDK's local mode.

    python -m bench.batch_transform --model-tar PATH [--image twostage-rec:latest] [--users N]
        [--workers W] [--max-payload-mb 6] [--env KEY=VALUE ...] [--as-of EPOCH] [--json OUT]

One JSON Lines file, a line ``{"user_id": ..., "top_k": 10}`` per user of the model (the first
``--users`` of them; more than the model has cycles through them again), goes through
``Model(...).transformer(strategy="MultiRecord", assemble_with="Line",
max_concurrent_transforms=W).transform(split_type="Line")`` against ``--image`` with
``SAGEMAKER_MODEL_SERVER_WORKERS=W`` (default: this machine's vCPUs, as the container's default).
Reported:

- *users/s*: users over the inference phase, from the first mini-batch sent to the last answer read;
- the *wall time* of ``transform(wait=True)`` and users/s over it (container start and stop included);
- each mini-batch's lines, size and time as the SDK's runtime client saw them, and where a
  mini-batch's time goes: the recommender's stage times summed over its answers' batches (the
  ``timings_ms`` that the answers of one recommender batch share), the rest being decoding,
  encoding and the model server.

Every output line is checked: one per input line, in order, each the answer for its user. Local
mode sends one mini-batch at a time whatever ``max_concurrent_transforms`` says (see
:mod:`local_test.sagemaker_local`); a real instance sends up to that many at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from bench.served import docker_cli, docker_unavailable
from local_test.sagemaker_local import (
    DUMMY_AWS_ENV,
    DUMMY_ROLE,
    SentRequest,
    compose_unavailable,
    container_logs,
    containers,
    free_port,
    local_session,
    record_requests,
    remove_containers,
    stage_model_tar,
)

JSON_LINES: Final = "application/jsonlines"
TOP_K: Final = 10
TARGET_USERS_PER_S: Final = 1000.0
STAGES: Final = ("history", "retrieval", "features", "ranking", "total")


class BenchError(RuntimeError):
    """The benchmark cannot run or its output is wrong; the message is one line."""


def request_lines(user_ids: Sequence[str], n_users: int, as_of: int | None = None) -> list[str]:
    """``n_users`` request lines over ``user_ids`` in order (cycling when there are fewer)."""
    if not user_ids:
        raise BenchError("the model has no users")
    lines = []
    for i in range(n_users):
        request: dict[str, Any] = {"user_id": user_ids[i % len(user_ids)], "top_k": TOP_K}
        if as_of is not None:
            request["as_of"] = as_of
        lines.append(json.dumps(request))
    return lines


def check_output(requests: Sequence[str], output: str) -> list[dict[str, Any]]:
    """The answers of ``output``, checked line by line against ``requests``; raises :class:`BenchError`."""
    if not output.endswith("\n") or "\n\n" in output:
        raise BenchError("the output is not one answer per line ending with a newline")
    answers = [json.loads(line) for line in output.splitlines()]
    if len(answers) != len(requests):
        raise BenchError(f"{len(answers)} output lines for {len(requests)} input lines")
    for number, (request, answer) in enumerate(zip(requests, answers), start=1):
        asked = json.loads(request)
        if "error" in answer:
            raise BenchError(f"line {number}: {answer['error']}: {answer['message']}")
        if answer["user_id"] != asked["user_id"]:
            raise BenchError(f"line {number}: the answer is for user {answer['user_id']!r}, not {asked['user_id']!r}")
        count = len(answer["recommendations"])
        if not 0 < count <= asked["top_k"]:
            raise BenchError(f"line {number}: {count} recommendations for top_k {asked['top_k']}")
    return answers


def stage_seconds(answers: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The recommender's time per stage over ``answers``, in seconds: consecutive answers with the
    same ``timings_ms`` came from one recommender batch, whose times count once."""
    totals = dict.fromkeys(STAGES, 0.0)
    previous: dict[str, float] | None = None
    batches = 0
    for answer in answers:
        timings = answer["timings_ms"]
        if timings != previous:
            batches += 1
            for stage in STAGES:
                totals[stage] += timings.get(stage, 0.0) / 1000.0
        previous = timings
    return {**{stage: round(value, 4) for stage, value in totals.items()}, "recommender_batches": batches}


def summarize_run(n_users: int, started: float, wall_s: float, sent: Sequence[SentRequest],
                  answers: Sequence[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """The figures of one run whose ``transform()`` began at ``started`` (``time.perf_counter()``) and
    took ``wall_s``: users/s over the inference phase and over the wall time, the mini-batches."""
    if not sent:
        raise BenchError("the transform sent no request")
    first = min(r.started for r in sent)
    last = max(r.started + r.seconds for r in sent)
    inference_s = last - first
    stages = stage_seconds(answers)
    requests_s = sum(r.seconds for r in sent)
    return {
        "users": n_users,
        "users_per_s": round(n_users / inference_s, 1),
        "inference_s": round(inference_s, 3),
        "wall_s": round(wall_s, 3),
        "users_per_s_wall": round(n_users / wall_s, 1),
        "before_first_request_s": round(first - started, 3),
        "after_last_answer_s": round(started + wall_s - last, 3),
        "mini_batches": [{"lines": r.lines, "bytes": r.body_bytes, "seconds": round(r.seconds, 4)} for r in sent],
        "requests_s": round(requests_s, 3),
        "recommender_s": stages,
        "outside_recommender_s": round(requests_s - stages["total"], 3),
    }


def container_cpu_s(container_id: str) -> float | None:
    """CPU seconds the running container has used (its cgroup's accounting), or None where unreadable."""
    full = subprocess.run([docker_cli(), "inspect", "-f", "{{.Id}}", container_id], capture_output=True, text=True,
                          timeout=60).stdout.strip()  # fmt: skip
    v1 = Path("/sys/fs/cgroup/cpuacct/docker") / full / "cpuacct.usage"  # nanoseconds
    if v1.is_file():
        return int(v1.read_text()) / 1e9
    cgroup_v2 = Path("/sys/fs/cgroup")
    for v2 in (cgroup_v2 / "docker" / full / "cpu.stat", cgroup_v2 / "system.slice" / f"docker-{full}.scope" / "cpu.stat"):
        if v2.is_file():
            fields = dict(line.split() for line in v2.read_text().splitlines())
            return int(fields["usage_usec"]) / 1e6
    return None


def meter_cpu(session: Any, container_root: Path) -> list[tuple[float | None, float | None]]:
    """The serving container's CPU seconds before and after each request the session sends (a
    second wrapper around its runtime client's ``invoke_endpoint``, outside :func:`record_requests`)."""
    client = session.sagemaker_runtime_client
    readings: list[tuple[float | None, float | None]] = []
    invoke = client.invoke_endpoint

    def metered(*args: Any, **kwargs: Any) -> Any:
        [container] = containers(container_root, docker_cli())
        before = container_cpu_s(container)
        response = invoke(*args, **kwargs)
        readings.append((before, container_cpu_s(container)))
        return response

    client.invoke_endpoint = metered
    return readings


def run(model_tar: Path, image: str, n_users: int | None, workers: int, max_payload_mb: int,
        env: dict[str, str], as_of: int | None, work: Path) -> dict[str, Any]:  # fmt: skip
    """Stage the model, write the requests, run the transform, check and summarize; ``work`` keeps
    the files (the container log as ``container.log``)."""
    from sagemaker.model import Model

    from twostage_rec.artifact import load_ids

    model_uri = stage_model_tar(model_tar, work / "model")
    with tarfile.open(model_tar) as archive:  # local mode extracts it there too; the ids are needed first
        archive.extractall(work / "model", filter="data")
    user_ids = list(load_ids(work / "model", "user"))
    requests = request_lines(user_ids, n_users or len(user_ids), as_of)
    data = work / "input" / "requests.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(requests) + "\n", encoding="utf-8")

    session = local_session(work / "containers", free_port())
    sent = record_requests(session)
    cpu = meter_cpu(session, work / "containers")
    # The container sizes its request limit from the job's SAGEMAKER_MAX_PAYLOAD_IN_MB itself.
    container_env = {"SAGEMAKER_MODEL_SERVER_WORKERS": str(workers), **env}
    model = Model(image_uri=image, model_data=model_uri, role=DUMMY_ROLE, sagemaker_session=session, env=container_env)
    transformer = model.transformer(
        instance_count=1, instance_type="local", strategy="MultiRecord", assemble_with="Line", accept=JSON_LINES,
        output_path=f"file://{work / 'output'}", max_concurrent_transforms=workers, max_payload=max_payload_mb,
    )  # fmt: skip
    print(f"{len(requests)} users ({data.stat().st_size / 1e6:.2f} MB of requests), image {image}, "
          f"{workers} workers, MaxPayloadInMB {max_payload_mb}", flush=True)  # fmt: skip
    try:
        started = time.perf_counter()
        transformer.transform(data=f"file://{data}", content_type=JSON_LINES, split_type="Line", wait=True, logs=False)
        wall_s = time.perf_counter() - started
        logs = "\n".join(container_logs(c, docker_cli()) for c in containers(work / "containers", docker_cli()))
        (work / "container.log").write_text(logs, encoding="utf-8")
    finally:
        session.delete_model(model.name)
        remove_containers(work / "containers", docker_cli())
    failed = [r for r in sent if r.status != 200]
    if failed:
        raise BenchError(f"{len(failed)} mini-batch(es) answered {failed[0].status}; see {work / 'container.log'}")
    answers = check_output(requests, (work / "output" / "requests.jsonl.out").read_text(encoding="utf-8"))
    summary = summarize_run(len(requests), started, wall_s, sent, answers)
    if cpu and all(before is not None and after is not None for before, after in cpu):
        cpu_s = sum(after - before for before, after in cpu)  # type: ignore[operator]
        summary["container_cpu_s"] = round(cpu_s, 3)
        summary["users_per_cpu_s"] = round(len(requests) / cpu_s, 1)
    summary.update(image=image, workers=workers, max_payload_mb=max_payload_mb, env=container_env,
                   model_tar=str(model_tar))  # fmt: skip
    return summary


def report(summary: dict[str, Any]) -> str:
    """The figures as a few lines of text."""
    met = "met" if summary["users_per_s"] >= TARGET_USERS_PER_S else "missed"
    batches = summary["mini_batches"]
    stages = summary["recommender_s"]
    # The stage times add up each batch's own clock; with BATCH_THREADS > 1 batches overlap, their
    # sum exceeds the mini-batch's time and the difference says nothing about the rest.
    outside = (
        f"decoding, encoding and the model server {summary['outside_recommender_s']:.2f} s"
        if summary["outside_recommender_s"] >= 0
        else "batches ran side by side on threads, so the rest cannot be told apart"
    )
    return "\n".join([
        f"users/s: {summary['users_per_s']:.0f} over the inference phase ({summary['users']} users in "
        f"{summary['inference_s']:.2f} s; target {TARGET_USERS_PER_S:.0f}: {met})",
        f"wall time of transform(): {summary['wall_s']:.2f} s ({summary['users_per_s_wall']:.0f} users/s; "
        f"{summary['before_first_request_s']:.2f} s before the first mini-batch, "
        f"{summary['after_last_answer_s']:.2f} s after the last answer)",
        f"mini-batches: {len(batches)}, lines {[b['lines'] for b in batches]}, "
        f"MB {[round(b['bytes'] / 1e6, 2) for b in batches]}, s {[b['seconds'] for b in batches]}",
        f"inside the mini-batches ({summary['requests_s']:.2f} s): recommender {stages['total']:.2f} s in "
        f"{stages['recommender_batches']} batches (history {stages['history']:.2f}, "
        f"retrieval {stages['retrieval']:.2f}, "
        f"features {stages['features']:.2f}, ranking {stages['ranking']:.2f}); " + outside,
    ] + ([f"container CPU during the mini-batches: {summary['container_cpu_s']:.2f} s "
          f"({summary['users_per_cpu_s']:.0f} users per CPU second)"]
         if "container_cpu_s" in summary else []))  # fmt: skip


def image_missing(image: str) -> str | None:
    """Why ``image`` cannot run here (local mode would try to pull it), or None."""
    found = subprocess.run([docker_cli(), "image", "inspect", image], capture_output=True, text=True, timeout=60)
    return None if found.returncode == 0 else f"image {image} not found: build it with make image (IMAGE={image})"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_transform", description=__doc__.splitlines()[0])
    parser.add_argument("--model-tar", type=Path, required=True, help="a model.tar.gz written by training")
    parser.add_argument("--image", default="twostage-rec:latest", help="the serving image (make image)")
    parser.add_argument("--users", type=int, default=None, help="this many users (default: every user of the model)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="SAGEMAKER_MODEL_SERVER_WORKERS and max_concurrent_transforms (default: vCPUs)")
    parser.add_argument("--max-payload-mb", type=int, default=6, help="MaxPayloadInMB (default 6, SageMaker's)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="container environment")
    parser.add_argument("--as-of", type=int, default=None, help="every request's as_of (default: the request time)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (requests, output, container log)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    problem = None
    if not args.model_tar.is_file():
        problem = f"--model-tar {args.model_tar}: no such file"
    elif args.users is not None and args.users < 1:
        problem = "--users must be at least 1"
    elif args.workers < 1 or not 1 <= args.max_payload_mb <= 100:
        problem = "--workers must be at least 1 and --max-payload-mb between 1 and 100"
    elif any("=" not in item or item.startswith("=") for item in args.env):
        problem = "--env takes KEY=VALUE"
    else:
        problem = docker_unavailable() or compose_unavailable() or image_missing(args.image)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    env = dict(item.split("=", 1) for item in args.env)
    os.environ.update(DUMMY_AWS_ENV)  # local mode needs a region and credentials; nothing reaches AWS
    logging.basicConfig(level=logging.WARNING)
    for name in ("sagemaker", "urllib3"):  # the SDK's polling of /ping logs every refused connection
        logging.getLogger(name).setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="bench-transform-"))
    try:
        summary = run(args.model_tar, args.image, args.users, args.workers, args.max_payload_mb, env, args.as_of, work)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(report(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
