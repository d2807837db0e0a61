"""Start, query and stop the real ``serve`` (and the multi-model-server it runs) on this host."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from twostage_rec.server import free_local_port

REPO = Path(__file__).resolve().parents[2]
SERVE_SCRIPT = REPO / "container" / "serve"
WORKERS = 2
MAX_REQUEST_BYTES = 4096
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0

@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Server:
    """A running ``serve``: its process, port, folders and combined stdout/stderr."""

    process: subprocess.Popen[bytes]
    port: int
    base_dir: Path
    hooks_dir: Path
    output_path: Path
    startup_s: float = 0.0
    descendants: list[psutil.Process] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # the session's settings; ``restart`` starts from them

    def output(self) -> str:
        return self.output_path.read_text(encoding="utf-8", errors="replace")

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            response = conn.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def invoke(self, body: bytes | str | dict[str, Any], content_type: str | None = "application/json",
               **headers: str) -> Reply:
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode("utf-8")
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        if content_type is not None:
            sent["Content-Type"] = content_type
        return self.request("POST", "/invocations", body, sent)


def free_port() -> int:
    """A free loopback port that multi-model-server accepts (it refuses anything above 32766)."""
    return free_local_port()


def serve_env(base_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "FEATURE_", "TWOSTAGE_"))}
    env.update(
        SAGEMAKER_BASE_DIR=str(base_dir),
        SAGEMAKER_BIND_TO_PORT=str(port),
        SAGEMAKER_MODEL_SERVER_WORKERS=str(WORKERS),
        PYTHONPATH=os.pathsep.join([str(REPO / "code"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.update(extra)
    return env


def run_serve(base_dir: Path, timeout_s: float = 120.0, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run ``serve`` expecting it to fail before starting MMS; kill its group if it does not."""
    process = subprocess.Popen(
        [sys.executable, str(SERVE_SCRIPT)],
        env=serve_env(base_dir, free_port(), **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def start(base_dir: Path, port: int, env: Mapping[str, str]) -> Server:
    """Start ``serve`` on the model in ``base_dir/model`` and wait until it answers.

    Its combined output goes to ``base_dir/serve.log`` (an earlier run's log is kept as
    ``serve-<n>.log``); everything it starts shares its process group.
    """
    output_path = base_dir / "serve.log"
    if output_path.exists():
        output_path.rename(base_dir / f"serve-{len(list(base_dir.glob('serve*.log')))}.log")
    hooks_dir = Path(env.get("TWOSTAGE_TEST_HOOKS", base_dir / "hooks"))
    started = time.monotonic()
    with output_path.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, str(SERVE_SCRIPT)], env=dict(env), stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Server(process, port, base_dir, hooks_dir, output_path, env=dict(env))
    try:
        wait_until_ready(running)
    except BaseException:
        kill_tree(process.pid)
        raise
    running.startup_s = time.monotonic() - started
    running.descendants = psutil.Process(process.pid).children(recursive=True)
    return running


def restart(server: Server, **overrides: str) -> None:
    """Stop ``server`` (if it runs) and start it again in place: same object, port and folder.

    ``overrides`` replace environment variables for this run only (``restart(server)`` goes back
    to the original ones). Tests that need other settings use this rather than a second server:
    only one multi-model-server may run on the host at a time.
    """
    if server.process.poll() is None:
        stop(server)
    for marker in server.hooks_dir.glob("load-*"):  # the load-once hook is per process: old ones are gone
        marker.unlink()
    fresh = start(server.base_dir, server.port, {**server.env, **overrides})
    server.process, server.startup_s, server.descendants = fresh.process, fresh.startup_s, fresh.descendants


def wait_until_ready(server: Server) -> None:
    """Wait for the ready line, a healthy /ping and one good invocation."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"serve exited with {server.process.returncode}:\n{server.output()}")
        if "serving model" in server.output():
            try:
                ping = server.request("GET", "/ping")
                if ping.status == 200 and server.invoke({"user_id": "alice"}).status == 200:
                    return
            except OSError:
                pass
        time.sleep(0.1)
    pytest.fail(f"serve not ready after {READY_TIMEOUT_S} s:\n{server.output()}")


def stop(server: Server) -> None:
    """SIGTERM ``serve`` and require it and everything it started to be gone within 30 s."""
    descendants = server.descendants or _children(server.process.pid)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=STOP_TIMEOUT_S)
        _, alive = psutil.wait_procs(descendants, timeout=max(0.1, started + STOP_TIMEOUT_S - time.monotonic()))
        stop_s = time.monotonic() - started
    finally:
        kill_tree(server.process.pid, descendants)
    print(f"\nserve: ready after {server.startup_s:.1f} s; SIGTERM -> all processes gone after {stop_s:.1f} s, "
          f"exit status {server.process.returncode}")
    assert not alive, f"still running {STOP_TIMEOUT_S} s after SIGTERM: {alive}"
    assert server.process.returncode == 128 + signal.SIGTERM, server.output()[-2000:]


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int, descendants: list[psutil.Process] | None = None) -> None:
    """SIGKILL ``pid``'s group, every known descendant and their groups (MMS has its own)."""
    processes = [*(descendants or []), *_children(pid)]
    groups = {pid}
    for process in processes:
        try:
            if process.is_running():  # psutil checks the pid was not reused
                groups.add(os.getpgid(process.pid))
                process.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    for group in groups - {os.getpgrp()}:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
