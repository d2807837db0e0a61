"""The serving image under the SageMaker Python SDK's local mode (``sagemaker.local.LocalSession``).

What the container tests (``tests/container/test_sagemaker_local.py``) and the Batch Transform
benchmark (``bench/batch_transform.py``) share. Facts of local mode (``sagemaker==2.257.7``,
``sagemaker/local/``) that shape these helpers:

- Every container is a ``docker-compose up`` of ``IMAGE serve``, publishing the container's 8080
  on the host port ``local.serving_port`` of the session's config (8080 unless set; here a free
  one), on all interfaces. Stopping an endpoint or a finished transform stops the container but
  leaves it in place: :func:`remove_containers` removes the ones whose compose file lives under
  the session's ``local.container_root``.
- A ``file://`` ``model.tar.gz`` is extracted into the folder that holds it, and that whole folder
  is mounted at ``/opt/ml/model``: :func:`stage_model_tar` copies the archive into a folder of its
  own, readable by the image's unprivileged user.
- ``InvokeEndpoint`` is a plain HTTP POST: a 4xx or 5xx body comes back as the response body, not
  as the ``ModelError`` the real sagemaker-runtime raises.
- A transform sends its mini-batches one at a time (``MaxConcurrentTransforms`` above 1 is logged
  and set to 1) and writes ``"\\n"`` after each response body when ``AssembleWith`` is ``Line``.
"""

from __future__ import annotations

import io
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

# SageMaker's intelligent-defaults config: no telemetry request, which would try the internet.
SDK_CONFIG: Final = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}
COMPOSE_DIR_LABEL: Final = "com.docker.compose.project.working_dir"
DUMMY_ROLE: Final = "arn:aws:iam::123456789012:role/x"
# Environment that local mode needs and that no real account backs: boto3 wants a region and
# credentials (it passes them into the container too).
DUMMY_AWS_ENV: Final = {
    "AWS_ACCESS_KEY_ID": "local",
    "AWS_SECRET_ACCESS_KEY": "local",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "SAGEMAKER_SUPPRESS_V2_WARNING": "1",
}


def compose_unavailable() -> str | None:
    """Why local mode cannot start containers here (no ``docker compose`` nor ``docker-compose``), or None."""
    try:
        from sagemaker.local.image import _SageMakerContainer
    except ImportError as exc:
        return f"the SageMaker Python SDK is not installed ({exc})"
    try:
        _SageMakerContainer._get_compose_cmd_prefix()  # the SDK's own check, as local mode runs it
    except ImportError as exc:
        return str(exc).splitlines()[0]
    return None


def free_port() -> int:
    """A port that is free on the host now (local mode publishes on every interface)."""
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        return int(probe.getsockname()[1])


def local_session(container_root: Path, serving_port: int) -> Any:
    """A ``LocalSession`` without telemetry whose containers keep their files under ``container_root``.

    Needs a region and credentials in the environment (:data:`DUMMY_AWS_ENV`).
    """
    from sagemaker.local import LocalSession

    container_root.mkdir(parents=True, exist_ok=True)
    session = LocalSession(sagemaker_config=SDK_CONFIG)
    session.config = {"local": {"local_code": True, "serving_port": serving_port,
                                "container_root": str(container_root)}}  # fmt: skip
    return session


def stage_model_tar(tar: Path, folder: Path) -> str:
    """Copy ``tar`` into ``folder`` (which local mode will also extract it into and mount) and
    return its ``file://`` URI; the folder and archive are made readable by every user."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    staged = folder / "model.tar.gz"
    shutil.copyfile(tar, staged)
    staged.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    return f"file://{staged.resolve()}"


def containers(container_root: Path, docker: str = "docker") -> list[str]:
    """Ids of the containers (running or not) that local mode started from compose files under ``container_root``."""
    listed = subprocess.run(
        [docker, "ps", "-a", "--filter", f"label={COMPOSE_DIR_LABEL}",
         "--format", f'{{{{.ID}}}} {{{{.Label "{COMPOSE_DIR_LABEL}"}}}}'],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    root = str(container_root.resolve())
    found = []
    for line in listed.stdout.splitlines():
        container_id, _, working_dir = line.partition(" ")
        if working_dir == root or working_dir.startswith(root + "/"):
            found.append(container_id)
    return found


def container_logs(container_id: str, docker: str = "docker") -> str:
    result = subprocess.run([docker, "logs", container_id], capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def remove_containers(container_root: Path, docker: str = "docker") -> list[str]:
    """Remove (force) every container of :func:`containers`; returns their ids."""
    found = containers(container_root, docker)
    if found:
        subprocess.run([docker, "rm", "-f", *found], capture_output=True, text=True, timeout=120)
    return found


@dataclass(frozen=True)
class SentRequest:
    """One ``/invocations`` call of a local session, as its runtime client made it."""

    lines: int
    body_bytes: int
    content_type: str | None
    accept: str | None
    status: int
    started: float  # time.perf_counter() when sent
    seconds: float  # until the whole answer was read


def record_requests(session: Any) -> list[SentRequest]:
    """Record every request the session's runtime client sends from now on (the list fills as they
    go). The answer is read inside the call, so ``seconds`` covers the whole exchange; the caller
    gets it as an in-memory body, as local mode reads it."""
    client = session.sagemaker_runtime_client
    sent: list[SentRequest] = []
    invoke = client.invoke_endpoint

    def recording(Body: Any, EndpointName: str, ContentType: str | None = None, Accept: str | None = None,
                  **options: Any) -> dict[str, Any]:  # fmt: skip
        body = Body.encode("utf-8") if isinstance(Body, str) else bytes(Body)
        started = time.perf_counter()
        response = invoke(body, EndpointName, ContentType, Accept, **options)
        raw = response["Body"]
        data = raw.read()
        raw.close()
        sent.append(SentRequest(len(body.splitlines()), len(body), ContentType, Accept, int(raw.status), started,
                                time.perf_counter() - started))  # fmt: skip
        return {**response, "Body": io.BytesIO(data)}

    client.invoke_endpoint = recording
    return sent
