"""A local SageMaker-style endpoint: the local Feature Store, its groups, and ``serve`` in Docker or on the host.

What ``make demo`` (``local_test/demo.py``) and the notebooks (``local_test/walkthrough.py``) share:

    with feature_store_server(out / "feature-store.db") as fs_url:
        history_group = setup_feature_groups(artifact, fs_url)
        port = free_local_port()
        with host_server(out, port, env):                 # or container(docker_engine(), image, ...)
            status, body = invoke(port, {"user_id": "1", "top_k": 5})

Failures raise :class:`EndpointError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REGION = "us-east-1"
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo"}
REPO = Path(__file__).resolve().parent.parent


class EndpointError(RuntimeError):
    """Starting or calling the local endpoint failed; the message is one line."""


@contextlib.contextmanager
def feature_store_server(db: Path) -> Iterator[str]:
    """The local Feature Store server on a free port with its database at ``db``; yields its URL."""
    from local_test.feature_store.testing import FeatureStoreServer

    step("starting the local Feature Store server")
    db.parent.mkdir(parents=True, exist_ok=True)
    server = FeatureStoreServer(db)
    try:
        server.start()
    except RuntimeError as exc:
        raise EndpointError(str(exc)) from None
    try:
        print(f"  {server.endpoint_url}")
        yield server.endpoint_url
    finally:
        server.stop()


def setup_feature_groups(artifact: Any, fs_url: str) -> str:
    """Create both feature groups and fill them; return the user-history group's name."""
    from training.feature_store import (
        create_item_feature_group,
        create_user_history_group,
        ingest_items,
        seed_user_histories,
        user_history_schema,
    )
    from local_test.feature_store.testing import make_clients

    sagemaker, runtime = make_clients(fs_url, REGION)
    name = create_item_feature_group(sagemaker, artifact)
    step(f"ingesting {artifact.manifest.n_items} item records into feature group {name}")
    ingest_items(runtime, artifact)
    history = user_history_schema(artifact.manifest)
    create_user_history_group(sagemaker, history)
    step(f"seeding {artifact.manifest.n_users} users' last {artifact.manifest.history_length} items "
         f"into feature group {history.feature_group_name}")
    report = seed_user_histories(runtime, artifact, history)
    if not report.ok:
        raise EndpointError(f"{report.events_failed} history events could not be stored")
    return history.feature_group_name


def events_put_command(group: str, user_id: str, item_id: str, region: str, history_length: int,
                       endpoint_url: str | None = None) -> list[str]:
    """``python -m training events put`` for one event (``endpoint_url`` None: the real Feature Store)."""
    command = [sys.executable, "-m", "training", "events", "put", "--feature-group", group,
               "--user-id", user_id, "--item-id", item_id, "--region", region]
    if endpoint_url:
        command += ["--endpoint-url", endpoint_url]
    return [*command, "--history-length", str(history_length), "--no-progress"]


@contextlib.contextmanager
def container(docker: str, image: str, model_dir: Path, port: int, env: dict[str, str]) -> Iterator[None]:
    """Build ``image`` and ``docker run IMAGE serve`` with the model mounted read-only, on host port ``port``."""
    step(f"building the serving image {image}")
    run([docker, "build", "-q", "-t", image, str(REPO)], env={**os.environ, "DOCKER_BUILDKIT": "1"})
    # The image runs as an unprivileged user; the mount is read-only.
    run(["chmod", "-R", "a+rX", str(model_dir)])
    name = f"twostage-demo-{os.getpid()}"
    step(f"docker run {image} serve (container {name}, host network, port {port})")
    env_args = [a for k, v in {**env, "SAGEMAKER_BIND_TO_PORT": str(port)}.items() for a in ("-e", f"{k}={v}")]
    # Host networking lets the container reach the Feature Store on the host's loopback.
    run([docker, "run", "-d", "--rm", "--name", name, "--network", "host",
         "-v", f"{model_dir}:/opt/ml/model:ro", *env_args, image, "serve"], quiet=True)
    try:
        wait_ready(port, lambda: subprocess.run([docker, "logs", name], check=False))
        yield
    finally:
        subprocess.run([docker, "stop", "-t", "30", name], check=False, capture_output=True)


@contextlib.contextmanager
def host_server(out: Path, port: int, env: dict[str, str], log: Path | None = None) -> Iterator[None]:
    """The ``serve`` entrypoint on the host, serving ``out/model`` with one worker; its output goes
    to ours, or to the file ``log``."""
    serve = shutil.which("serve", path=str(Path(sys.executable).parent)) or "serve"
    sink = open(log, "wb") if log is not None else None  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [serve],
        env={**os.environ, **env, "SAGEMAKER_BASE_DIR": str(out), "SAGEMAKER_BIND_TO_PORT": str(port),
             "SAGEMAKER_MODEL_SERVER_WORKERS": "1"},
        stdout=sink, stderr=sink, start_new_session=True,
    )
    try:
        try:
            wait_ready(port, lambda: None, proc)
        except EndpointError as exc:
            raise EndpointError(f"{exc} (its log: {log})" if log is not None else str(exc)) from None
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        if sink is not None:
            sink.close()


def wait_ready(port: int, on_failure: Callable[[], Any], proc: subprocess.Popen[bytes] | None = None,
               timeout: float = 120) -> None:
    """Poll ``/ping`` until it answers 200; ``on_failure`` runs (e.g. prints logs) before giving up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise EndpointError(f"serve exited with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    on_failure()
    raise EndpointError(f"the server did not answer /ping on port {port} within {timeout:.0f} s")


def invoke(port: int, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST ``payload`` to ``/invocations``; returns (HTTP status, decoded JSON body)."""
    # MMS answers /ping before the workers are up: retry the first call briefly.
    for attempt in range(60):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/invocations", json.dumps(payload), {"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        if response.status not in (502, 503) or attempt == 59:
            return response.status, json.loads(body)
        time.sleep(0.5)
    raise AssertionError("unreachable")


def docker_engine() -> str | None:
    """The docker CLI's path when an engine answers ``docker info``, else None."""
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and subprocess.run([candidate, "info"], capture_output=True).returncode == 0:
            return candidate
    return None


def run(cmd: list[str], env: dict[str, str] | None = None, quiet: bool = False) -> None:
    """Run ``cmd`` in the repository; its output goes to ours."""
    result = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL if quiet else None)
    if result.returncode != 0:
        raise EndpointError(f"`{' '.join(cmd[:3])} ...` failed with status {result.returncode}")


def titles(dataset: str) -> dict[str, str]:
    """Item id -> title for ``dataset``; empty when it has none (titles are decoration)."""
    try:
        from training.datasets import load_dataset

        items = load_dataset(dataset).items
    except Exception:  # noqa: BLE001 - titles are decoration; never fail for them
        return {}
    if "title" not in items.columns:
        return {}
    return dict(zip(items["item_id"], items["title"].fillna("")))


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)
