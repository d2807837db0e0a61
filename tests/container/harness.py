"""Helpers for the container tests: run the image, talk HTTP to it, read its logs."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PAYLOADS = ROOT / "local_test" / "payloads"
JSON = "application/json"


def docker_cli() -> str:
    return os.environ.get("DOCKER_CLI") or ("/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker")


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([docker_cli(), *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:2])} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Container:
    """One ``docker run IMAGE serve`` with the model mounted read-only and its port on a random host port."""

    image: str
    model_dir: Path
    env: Mapping[str, str] = field(default_factory=dict)
    extra_args: Sequence[str] = ()
    port: int = 8080  # inside the container; SageMaker may move it with SAGEMAKER_BIND_TO_PORT
    name: str = field(default_factory=lambda: f"tsr-test-{uuid.uuid4().hex[:10]}")
    url: str = ""
    cold_start_s: float = float("nan")

    def start(self, ready_timeout_s: float = 180.0) -> Container:
        """Run the container and wait for the first good invocation (``/ping`` alone proves little)."""
        env_args = [arg for key, value in self.env.items() for arg in ("-e", f"{key}={value}")]
        started = time.monotonic()
        docker(
            "run", "-d", "--name", self.name, "-p", f"127.0.0.1::{self.port}",
            "-v", f"{self.model_dir}:/opt/ml/model:ro", *env_args, *self.extra_args, self.image, "serve",
        )  # fmt: skip
        self.url = "http://" + docker("port", self.name, str(self.port)).stdout.split()[0]
        deadline = started + ready_timeout_s
        while time.monotonic() < deadline:
            if self.ping() == 200 and self.invoke(payload("single.json")).status == 200:
                self.cold_start_s = time.monotonic() - started
                return self
            if not self.running():
                raise RuntimeError(f"container {self.name} exited before serving:\n{self.logs()[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"container {self.name} not serving after {ready_timeout_s} s:\n{self.logs()[-3000:]}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None,
                timeout: float = 30.0) -> Response:  # fmt: skip
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(req, timeout=timeout) as answer:
                return Response(answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read())
        except urllib.error.HTTPError as error:
            return Response(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())
        except OSError:  # not listening yet, reset while starting
            return Response(0, {}, b"")

    def ping(self) -> int:
        return self.request("GET", "/ping", timeout=5).status

    def invoke(self, body: bytes, content_type: str | None = JSON, accept: str | None = None) -> Response:
        headers = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if accept is not None:
            headers["Accept"] = accept
        return self.request("POST", "/invocations", body, headers)

    def running(self) -> bool:
        state = docker("inspect", "-f", "{{.State.Running}}", self.name, check=False)
        return state.stdout.strip() == "true"

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def stop(self, grace_s: int = 30) -> tuple[float, int]:
        """``docker stop -t grace_s``; returns (seconds it took, the container's exit code)."""
        started = time.monotonic()
        docker("stop", "-t", str(grace_s), self.name, timeout=grace_s + 60)
        took = time.monotonic() - started
        exit_code = int(docker("inspect", "-f", "{{.State.ExitCode}}", self.name).stdout.strip())
        return took, exit_code

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


def payload(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()
