"""Where the server under test runs: the image in Docker, or the ``serve`` entrypoint on the host.

Both expose ``host``, ``port``, ``pids()`` (host process ids of everything serving, for memory
figures) and ``stop()``. Only one multi-model-server may run on a host at a time: do not start a
:class:`HostServe` while another one (or a test session's server) runs.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from twostage_rec.server import free_local_port

REPO = Path(__file__).resolve().parents[1]
DOCKER = "/usr/bin/docker"
READY_TIMEOUT_S = 180.0


class TargetError(RuntimeError):
    """The server under test could not be started; the message says why in one line."""


class Target(Protocol):
    host: str
    port: int
    label: str

    def pids(self) -> list[int]: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class Memory:
    """Memory of the serving processes. RSS counts shared pages in every process, PSS splits them.

    ``java_pss_mb`` is multi-model-server's frontend (its heap grows under load for the first tens
    of seconds, then plateaus); ``python_pss_mb`` is ``serve``, the backend and the workers: ours.
    """

    rss_mb: float
    pss_mb: float
    java_pss_mb: float
    python_pss_mb: float
    processes: int


def memory(pids: list[int]) -> Memory:
    rss = pss = java = python = 0
    counted = 0
    for pid in pids:
        try:
            process = psutil.Process(pid)
            info, name = process.memory_full_info(), process.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        share = getattr(info, "pss", info.rss)
        rss, pss, counted = rss + info.rss, pss + share, counted + 1
        if name == "java":
            java += share
        elif name.startswith("python"):
            python += share
    mb = 2**20
    return Memory(rss / mb, pss / mb, java / mb, python / mb, counted)


def docker_available() -> bool:
    """True when a Docker engine answers ``docker info``."""
    try:
        return subprocess.run([DOCKER, "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def wait_until_serving(
    host: str, port: int, body: bytes, alive: Callable[[], bool], timeout_s: float = READY_TIMEOUT_S
) -> None:
    """Poll ``/invocations`` with ``body`` until it answers 200; fail early if ``alive()`` is false."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise TargetError("the server exited before answering; see its log")
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    raise TargetError(f"no answer from {host}:{port} within {timeout_s:.0f} s")


def warm_up_body(model_dir: Path) -> bytes:
    from twostage_rec.artifact import load_ids

    return json.dumps({"user_id": load_ids(model_dir, "user")[0]}).encode()


class HostServe:
    """``container/serve`` on this host, on a copy of the model, in its own process group."""

    label = "host"

    def __init__(self, model_dir: Path, run_dir: Path, workers: int = 2, env: dict[str, str] | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        base_dir = run_dir / "serve"
        shutil.copytree(model_dir, base_dir / "model", dirs_exist_ok=True)
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "FEATURE_", "TWOSTAGE_"))}
        full_env = {
            **clean,
            "SAGEMAKER_BASE_DIR": str(base_dir),
            "SAGEMAKER_BIND_TO_PORT": str(self.port),
            "SAGEMAKER_MODEL_SERVER_WORKERS": str(workers),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "code"), clean.get("PYTHONPATH")) if p),
            **(env or {}),
        }
        self.log_path = run_dir / "serve.log"
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, str(REPO / "container" / "serve")],
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until_serving(self.host, self.port, warm_up_body(model_dir), lambda: self._process.poll() is None)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self._process.pid

    def pids(self) -> list[int]:
        try:
            root = psutil.Process(self._process.pid)
            return [root.pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM ``serve`` (it stops multi-model-server), SIGKILL the group if it lingers."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._process.wait()
        return self._process.returncode


class DockerServe:
    """``docker run IMAGE serve`` with the model mounted read-only, published on a loopback port."""

    label = "container"

    def __init__(self, image: str, model_dir: Path, run_dir: Path, workers: int = 2, cpus: float | None = None) -> None:
        self.host = "127.0.0.1"
        self.name = f"twostage-reliability-{uuid.uuid4().hex[:10]}"
        self.log_path = run_dir / "serve.log"
        model_copy = run_dir / "model"
        shutil.copytree(model_dir, model_copy, dirs_exist_ok=True)
        # The image runs as an unprivileged user; the mount must be world-readable.
        for path in [model_copy, *model_copy.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        command = [
            DOCKER, "run", "-d", "--name", self.name, "-p", "127.0.0.1::8080",
            "-v", f"{model_copy}:/opt/ml/model:ro", "-e", f"SAGEMAKER_MODEL_SERVER_WORKERS={workers}",
        ]
        if cpus:
            command += ["--cpus", str(cpus)]
        run = subprocess.run([*command, image, "serve"], capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise TargetError(f"docker run {image} failed: {run.stderr.strip().splitlines()[-1:]}")
        try:
            mapping = _docker("port", self.name, "8080/tcp").strip().splitlines()[0]
            self.port = int(mapping.rsplit(":", 1)[1])
            wait_until_serving(self.host, self.port, warm_up_body(model_dir), self._running)
        except BaseException:
            self.stop()
            raise

    def _running(self) -> bool:
        return _docker("inspect", "-f", "{{.State.Running}}", self.name, check=False).strip() == "true"

    def pids(self) -> list[int]:
        out = _docker("top", self.name, "-eo", "pid", check=False)
        return [int(line) for line in out.split()[1:] if line.isdigit()]

    def stop(self) -> int | None:
        """``docker stop`` (SIGTERM, then SIGKILL after 30 s), keep the log, remove the container."""
        _docker("stop", "-t", "30", self.name, check=False)
        status = _docker("inspect", "-f", "{{.State.ExitCode}}", self.name, check=False).strip()
        logs = subprocess.run([DOCKER, "logs", self.name], capture_output=True, timeout=60)
        self.log_path.write_bytes(logs.stdout + logs.stderr)
        _docker("rm", "-f", self.name, check=False)
        return int(status) if status.lstrip("-").isdigit() else None


def _docker(*args: str, check: bool = True) -> str:
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise TargetError(f"docker {args[0]} failed: {result.stderr.strip()}")
    return result.stdout


def free_port() -> int:
    """A free loopback port that multi-model-server accepts (it refuses anything above 32766)."""
    return free_local_port()