"""The serving image end to end: ``docker run IMAGE serve`` with the tiny model mounted read-only.

Measurements (cold start, stop time) are printed, never asserted: timing here is noisy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.container.harness import JSON, ROOT, Container, docker, docker_cli, payload

pytestmark = pytest.mark.container

MAX_REQUEST_BYTES = 2048  # small, so the 413 test needs only a small body


@pytest.fixture(scope="module")
def served(image: str, model_dir: Path) -> Iterator[Container]:
    """One container for the request tests, with the embedded feature source."""
    container = Container(image, model_dir, {"SAGEMAKER_MODEL_SERVER_WORKERS": "1",
                                             "MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES)})  # fmt: skip
    try:
        container.start()
        print(f"\n[container] cold start (docker run -> first good invocation): {container.cold_start_s:.2f} s")
        yield container
    finally:
        container.remove()


def ok_json(response: Any) -> Any:
    assert response.status == 200, response.body
    assert response.headers.get("content-type", "").startswith(JSON)
    return response.json()


def test_single_request(served: Container) -> None:
    answer = ok_json(served.invoke(payload("single.json")))
    items = [r["item_id"] for r in answer["recommendations"]]
    assert answer["user_id"] == "alice" and answer["model_version"] == "tiny-1"
    assert items == ["i1", "i2", "i3", "i4", "i5"]  # alice's MF order; i0 is seen
    assert [r["rank"] for r in answer["recommendations"]] == [1, 2, 3, 4, 5]
    assert answer["fallback"] is None and answer["degraded"] is False


def test_batch_request_keeps_the_order(served: Container) -> None:
    answer = ok_json(served.invoke(payload("batch.json")))
    assert [p["user_id"] for p in answer["predictions"]] == ["alice", "bob", "carol"]
    assert [len(p["recommendations"]) for p in answer["predictions"]] == [3, 3, 6]


def test_unknown_user_and_filters(served: Container) -> None:
    unknown = ok_json(served.invoke(payload("unknown_user.json")))
    assert unknown["fallback"] == "popular" and len(unknown["recommendations"]) == 3
    filtered = ok_json(served.invoke(payload("filters.json")))
    # even items are i0, i2, i4 (prices 10, 30, 50); i2 is excluded by the request.
    assert {r["item_id"] for r in filtered["recommendations"]} == {"i0", "i4"}


def test_content_type_parameters_are_accepted(served: Container) -> None:
    ok_json(served.invoke(payload("single.json"), content_type="application/json; charset=utf-8", accept="*/*"))


@pytest.mark.parametrize(
    ("body", "content_type", "accept", "status", "error"),
    [
        (payload("bad_input.json"), JSON, None, 400, "bad_request"),
        (b'{"user_id": "alice"', JSON, None, 400, "bad_request"),
        (b'{"user_id": "nobody", "on_unknown_user": "error"}', JSON, None, 404, "user_not_found"),
        (payload("single.json"), JSON, "text/csv", 406, "not_acceptable"),
        (b'{"user_id": "' + b"x" * (MAX_REQUEST_BYTES + 10) + b'"}', JSON, None, 413, "payload_too_large"),
        (b"user_id\nalice\n", "text/csv", None, 415, "unsupported_media_type"),
    ],
    ids=["invalid", "malformed", "unknown-user", "accept-csv", "too-large", "csv-body"],
)
def test_client_errors_are_json_with_their_status(
    served: Container, body: bytes, content_type: str, accept: str | None, status: int, error: str
) -> None:
    response = served.invoke(body, content_type=content_type, accept=accept)
    assert response.status == status, response.body
    answer = response.json()
    assert answer["error"] == error and answer["message"] and answer["request_id"]
    assert "Traceback" not in response.body.decode()


def test_logs_hold_no_traceback_after_client_errors(served: Container) -> None:
    served.invoke(payload("bad_input.json"))
    served.invoke(b"not json at all", content_type=JSON)
    served.invoke(payload("single.json"), content_type="text/plain")
    logs = served.logs()
    assert "serving model tiny-1 on port 8080 with 1 workers" in logs
    assert "Traceback" not in logs


def test_runs_unprivileged_on_a_read_only_model(served: Container) -> None:
    assert docker("exec", served.name, "id", "-u").stdout.strip() != "0"
    mounts = json.loads(docker("inspect", "-f", "{{json .Mounts}}", served.name).stdout)
    assert [(m["Destination"], m["RW"]) for m in mounts] == [("/opt/ml/model", False)]


def test_the_image_stays_under_650_mb_and_has_no_torch(image: str) -> None:
    size = int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
    assert size <= 650_000_000, f"image is {size / 1e6:.0f} MB"  # docker's MB, as `docker images` shows
    probe = "import importlib.util as u; print(u.find_spec('torch') is None, u.find_spec('onnxruntime') is not None)"
    result = docker("run", "--rm", "--entrypoint", "/opt/venv/bin/python", image, "-c", probe, timeout=60)
    assert result.stdout.split() == ["True", "True"]


def test_any_command_but_serve_prints_usage_and_exits_2(image: str) -> None:
    result = docker("run", "--rm", image, "train", check=False, timeout=60)
    assert result.returncode == 2
    assert "usage: docker run IMAGE serve" in result.stderr


def test_sagemaker_can_move_the_port(start_container: Any) -> None:
    container = start_container(env={"SAGEMAKER_BIND_TO_PORT": "9090", "SAGEMAKER_MODEL_SERVER_WORKERS": "1"}, port=9090)
    ok_json(container.invoke(payload("single.json")))
    # serve prints the line after its own first good request, which on a loaded machine can come
    # after ours: wait for it (a deadline for a log line, not a timing).
    deadline = time.monotonic() + 60
    while "serving model tiny-1 on port 9090" not in container.logs() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "serving model tiny-1 on port 9090" in container.logs()


def test_sigterm_stops_the_container_gracefully(start_container: Any) -> None:
    container = start_container(env={"SAGEMAKER_MODEL_SERVER_WORKERS": "1"})
    took, exit_code = container.stop(grace_s=30)
    print(f"\n[container] docker stop -t 30 took {took:.2f} s, exit code {exit_code}")
    assert exit_code != 128 + signal.SIGKILL  # stopped by SIGTERM, not killed when the grace ran out
    logs = container.logs()
    assert "Traceback" not in logs
    # The worker's CloudWatch metrics reach the container log as bare JSON lines, written at stop:
    # serve's warm-up request and the harness's readiness check.
    records = [json.loads(line) for line in logs.splitlines() if line.startswith('{"_aws":')]
    assert sum(r["Requests"] for r in records if "Breaker" not in r) == 2
    assert {r["ModelVersion"] for r in records} == {"tiny-1"}


# --- the Feature Store source against the local Feature Store on the host --------------------


@pytest.fixture
def feature_store(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """The local Feature Store on all interfaces (the container reaches it through the bridge),
    holding the tiny model's item records. Yields (process, port)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "local_test.feature_store", "serve", "--host", "0.0.0.0", "--port", "0",
         "--db", str(tmp_path / "fs.sqlite")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"listening on http://[^:]+:(\d+)", line)
        assert match, f"the local Feature Store did not start: {line!r}"
        port = int(match.group(1))
        _ingest_tiny_items(f"http://127.0.0.1:{port}", tiny_model_dir)
        yield process, port
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _ingest_tiny_items(endpoint_url: str, model_dir: Path) -> None:
    from local_test.feature_store.testing import make_clients
    from training.feature_store import create_item_feature_group, ingest_items
    from twostage_rec.artifact import load_artifact

    sagemaker, runtime = make_clients(endpoint_url)
    artifact = load_artifact(model_dir)
    create_item_feature_group(sagemaker, artifact)
    assert ingest_items(runtime, artifact, show_progress=False) == 6


def _batch_get_calls(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_admin/stats", timeout=10) as answer:
        return int(json.load(answer).get("BatchGetRecord", 0))


def test_feature_store_source_and_its_degraded_fallback(
    start_container: Any, feature_store: tuple[subprocess.Popen[str], int]
) -> None:
    process, port = feature_store
    container = start_container(
        env={
            "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
            "FEATURE_GROUP_NAME": "tiny-items",
            "FEATURE_SOURCE": "featurestore",  # no cache: every request reads the store
            "FEATURE_STORE_ENDPOINT_URL": f"http://host.docker.internal:{port}",
            # A worker's first request builds its boto3 client (~0.15-0.4 s here), which can
            # overrun the default 200 ms deadline and answer from the snapshot; that is not
            # what this test is about.
            "FEATURE_STORE_DEADLINE_MS": "5000",
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
        },
        extra_args=["--add-host=host.docker.internal:host-gateway"],
    )
    calls_before = _batch_get_calls(port)
    for name in ("single.json", "filters.json", "single.json"):
        answer = ok_json(container.invoke(payload(name)))
        assert answer["degraded"] is False, answer
    assert _batch_get_calls(port) >= calls_before + 3  # the answers did come from the store

    process.kill()
    process.wait()
    for _ in range(2):
        started = time.monotonic()
        answer = ok_json(container.invoke(payload("single.json")))
        assert answer["degraded"] is True, answer
        assert [r["item_id"] for r in answer["recommendations"]] == ["i1", "i2", "i3", "i4", "i5"]
        print(f"\n[container] degraded answer in {time.monotonic() - started:.3f} s")
    assert "Traceback" not in container.logs()


# --- local_test/serve_local.sh and predict.sh, the scripts people use ---------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_serve_local_and_predict_scripts(image: str, model_dir: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PORT": str(port), "DOCKER_CLI": docker_cli(), "SAGEMAKER_MODEL_SERVER_WORKERS": "1"}
    name = f"twostage-rec-local-{port}"  # the name serve_local.sh gives its container
    server = subprocess.Popen([str(ROOT / "local_test" / "serve_local.sh"), str(model_dir), image], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    predict = str(ROOT / "local_test" / "predict.sh")
    try:
        deadline = time.monotonic() + 120
        while True:
            single = subprocess.run([predict], env=env, capture_output=True, text=True, timeout=60)
            if single.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
            time.sleep(0.3)
        assert single.returncode == 0, single.stderr
        assert json.loads(single.stdout)["user_id"] == "alice"
        bad = subprocess.run([predict, str(ROOT / "local_test" / "payloads" / "bad_input.json")], env=env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert bad.returncode != 0 and json.loads(bad.stdout)["error"] == "bad_request"
    finally:
        docker("stop", "-t", "30", name, check=False, timeout=90)
        output, _ = server.communicate(timeout=60)
    assert server.returncode is not None and "Traceback" not in output


def test_serve_local_refuses_a_model_the_container_cannot_read(tmp_path: Path) -> None:
    private = tmp_path / "model"
    private.mkdir(mode=0o700)
    result = subprocess.run([str(ROOT / "local_test" / "serve_local.sh"), str(private)], capture_output=True,
                            text=True, timeout=30, env={**os.environ, "DOCKER_CLI": "/nonexistent/docker"})  # fmt: skip
    assert result.returncode == 2
    assert f"run: chmod -R a+rX {private}" in result.stderr
