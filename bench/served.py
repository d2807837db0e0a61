"""End-to-end benchmarks: the real ``serve`` (multi-model-server) on this host or in a container.

Load comes from threads that each hold one keep-alive ``http.client`` connection and send their
share of the request bodies back to back. Only one model server runs at a time: the host has one
set of cores, and multi-model-server must not run twice on one host.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import psutil

from bench.stats import summarize

REPO: Final = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S: Final = 300.0
JSON_HEADERS: Final = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Reply:
    """One ``/invocations`` answer as the client saw it."""

    status: int
    latency_ms: float
    answer: dict[str, Any] | None  # the decoded body of a 200, else None

    @property
    def first(self) -> dict[str, Any] | None:
        """The answer of one user: a single request's, or a batch's first (a batch shares its
        timings and its ``degraded`` flag)."""
        if self.answer is None:
            return None
        return self.answer["predictions"][0] if "predictions" in self.answer else self.answer


class Client:
    """One keep-alive connection to a server's ``/invocations`` (``http.client`` sends the
    headers and the body in one write)."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self._conn = http.client.HTTPConnection(host, port, timeout=timeout)

    def invoke(self, body: bytes) -> Reply:
        """POST ``body``; raises ``OSError`` / ``http.client.HTTPException`` when the connection breaks."""
        sent = time.perf_counter()
        self._conn.request("POST", "/invocations", body, JSON_HEADERS)
        response = self._conn.getresponse()
        payload = response.read()
        latency = (time.perf_counter() - sent) * 1000.0
        return Reply(response.status, latency, json.loads(payload) if response.status == 200 else None)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def run_load(host: str, port: int, bodies: Sequence[bytes], concurrency: int) -> dict[str, Any]:
    """Send every body once over ``concurrency`` keep-alive connections; summarize what came back
    (:func:`load_summary`: client latency minus the handler's own time is what HTTP and the model
    server add), with the throughput."""
    shares = [list(bodies[t::concurrency]) for t in range(concurrency)]
    replies: list[list[Reply]] = [[] for _ in shares]
    errors = [0] * concurrency
    start = threading.Barrier(concurrency + 1)

    def client(t: int) -> None:
        start.wait()
        try:
            with Client(host, port) as connection:
                for body in shares[t]:
                    replies[t].append(connection.invoke(body))
        except (OSError, http.client.HTTPException):
            errors[t] += 1  # the connection broke: the rest of this thread's share is not sent

    threads = [threading.Thread(target=client, args=(t,), daemon=True) for t in range(concurrency)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    flat = [reply for share in replies for reply in share]
    summary = load_summary(flat)
    if summary["errors"] == len(flat):
        raise RuntimeError(f"no request to http://{host}:{port}/invocations succeeded ({sum(errors)} errors)")
    return {"concurrency": concurrency, **summary, "errors": summary["errors"] + sum(errors),
            "seconds": round(seconds, 3), "rps": round(len(flat) / seconds, 1)}


def load_summary(replies: Sequence[Reply]) -> dict[str, Any]:
    """Requests, errors (not 200), client latency, and from each answer: the handler's own
    ``timings_ms.total``, its history stage (with a user-history group, the Feature Store read)
    and how many said ``degraded``. Summaries are ``None`` when nothing answered."""
    answers = [reply.first for reply in replies if reply.first is not None]

    def summary(values: Sequence[float]) -> dict[str, Any] | None:
        return summarize(values).to_json() if values else None

    return {
        "requests": len(replies),
        "errors": len(replies) - len(answers),
        "latency_ms": summary([reply.latency_ms for reply in replies]),
        "handler_ms": summary([a["timings_ms"]["total"] for a in answers]),
        "history_ms": summary([a["timings_ms"]["history"] for a in answers]),
        "degraded": sum(bool(a["degraded"]) for a in answers),
    }


def free_port() -> int:
    """A free loopback port that multi-model-server accepts (it refuses anything above 32766)."""
    from twostage_rec.server import free_local_port

    return free_local_port()


def wait_for_answer(host: str, port: int, body: bytes, started: float, alive: Callable[[], bool]) -> float:
    """Poll ``/invocations`` until it answers 200; return the seconds since ``started``."""
    while time.monotonic() - started < READY_TIMEOUT_S:
        if not alive():
            raise RuntimeError("the model server exited before answering")
        try:
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("POST", "/invocations", body, JSON_HEADERS)
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return time.monotonic() - started
        except OSError:  # not listening yet
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the model server did not answer within {READY_TIMEOUT_S:.0f} s")


class HostServer:
    """``container/serve`` on this host for one model folder, with ``workers`` model-server workers.

    ``start`` returns the cold start: process start to the first good ``/invocations`` answer.
    """

    def __init__(self, model_dir: Path, workers: int, log_path: Path) -> None:
        if model_dir.name != "model":
            raise ValueError(f"{model_dir}: serve expects the model at $SAGEMAKER_BASE_DIR/model")
        self.model_dir = model_dir
        self.workers = workers
        self.log_path = log_path
        self.port = free_port()
        self.host = "127.0.0.1"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, probe_body: bytes) -> float:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGEMAKER_", "FEATURE_"))}
        env.update(
            SAGEMAKER_BASE_DIR=str(self.model_dir.parent),
            SAGEMAKER_BIND_TO_PORT=str(self.port),
            SAGEMAKER_MODEL_SERVER_WORKERS=str(self.workers),
            PYTHONPATH=os.pathsep.join([str(REPO / "code"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, str(REPO / "container" / "serve")], env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stop() can reach everything it started
            )
        try:
            return wait_for_answer(self.host, self.port, probe_body, started, lambda: self._process.poll() is None)
        except RuntimeError as exc:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"serve ({self.model_dir}, {self.workers} workers): {exc}\n{tail}") from None

    def processes(self) -> list[psutil.Process]:
        assert self._process is not None
        root = psutil.Process(self._process.pid)
        return [root, *root.children(recursive=True)]

    def pss_mb(self) -> dict[str, Any]:
        """PSS in MB of serve, Java, the Python process that preloads the model and the workers it forks."""
        processes = self.processes()
        java_pids = {p.pid for p in processes if p.ppid() == self._process.pid and "java" in p.name()}
        rows = []
        for process in processes:
            try:
                pss = process.memory_full_info().pss / 2**20
                cmdline = " ".join(process.cmdline())
                parent = process.ppid()
            except psutil.NoSuchProcess:
                continue
            if process.pid == self._process.pid:
                role = "serve"
            elif process.pid in java_pids:
                role = "java"
            else:
                role = "preload" if parent in java_pids else "worker"
            rows.append({"pid": process.pid, "role": role, "pss_mb": round(pss, 1), "cmd": cmdline[:120]})
        worker_pss = [r["pss_mb"] for r in rows if r["role"] == "worker"]
        return {
            "total_mb": round(sum(r["pss_mb"] for r in rows), 1),
            "workers_mb": round(sum(worker_pss), 1),
            "per_worker_mb": round(sum(worker_pss) / len(worker_pss), 1) if worker_pss else None,
            "processes": rows,
        }

    def stop(self) -> None:
        """SIGTERM serve (it forwards to Java's group); SIGKILL whatever is left after 30 s."""
        if self._process is None:
            return
        try:
            leftovers = self.processes()[1:]
        except psutil.NoSuchProcess:
            leftovers = []
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        _, alive = psutil.wait_procs(leftovers, timeout=10)
        for process in alive:
            process.kill()
        self._process = None

    def __enter__(self) -> HostServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def docker_cli() -> str:
    return os.environ.get("DOCKER_CLI") or "/usr/bin/docker"


def docker(*args: str, timeout: float = 120.0) -> str:
    result = subprocess.run([docker_cli(), *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:2])} failed: {result.stderr.strip()[-1500:]}")
    return result.stdout


def docker_unavailable() -> str | None:
    """Why no container benchmark can run, or ``None`` when an engine answers."""
    try:
        info = subprocess.run([docker_cli(), "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{docker_cli()} info: {exc}"
    return None if info.returncode == 0 else (info.stderr.strip().splitlines() or ["no answer"])[-1]


def build_image(tag: str) -> float:
    """``docker build`` this checkout; return the seconds it took."""
    started = time.monotonic()
    build = subprocess.run(
        [docker_cli(), "build", "-q", "-t", tag, str(REPO)], capture_output=True, text=True, timeout=1800,
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
    )
    if build.returncode != 0:
        raise RuntimeError(f"docker build -t {tag} failed:\n{build.stderr.strip()[-3000:]}")
    return time.monotonic() - started


class ContainerServer:
    """``docker run IMAGE serve`` with the model mounted read-only and ``env`` set in the container;
    removed (by its name) on exit.

    Host networking, with the server on a free port: no docker-proxy between the client and the
    server (SageMaker does not have one either), and no dependency on the engine's bridge.
    """

    def __init__(self, image: str, model_dir: Path, workers: int, env: Mapping[str, str] | None = None) -> None:
        self.image = image
        self.model_dir = model_dir
        self.workers = workers
        self.env = dict(env or {})
        self.name = f"twostage-bench-{uuid.uuid4().hex[:10]}"
        self.host = "127.0.0.1"
        self.port = free_port()

    def start(self, probe_body: bytes) -> float:
        started = time.monotonic()
        docker(
            "run", "-d", "--name", self.name, "--network", "host", "-v", f"{self.model_dir}:/opt/ml/model:ro",
            "-e", f"SAGEMAKER_BIND_TO_PORT={self.port}", "-e", f"SAGEMAKER_MODEL_SERVER_WORKERS={self.workers}",
            *(arg for name, value in self.env.items() for arg in ("-e", f"{name}={value}")),
            self.image, "serve",
        )
        try:
            return wait_for_answer(self.host, self.port, probe_body, started, self.running)
        except RuntimeError as exc:
            raise RuntimeError(f"container {self.name}: {exc}\n{self.logs()[-2000:]}") from None

    def running(self) -> bool:
        return docker("inspect", "-f", "{{.State.Running}}", self.name).strip() == "true"

    def logs(self, timestamps: bool = False) -> str:
        """The container's output so far; with ``timestamps``, each line starts with Docker's RFC 3339 time."""
        command = [docker_cli(), "logs", *(["--timestamps"] if timestamps else []), self.name]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        return result.stdout + result.stderr

    def __enter__(self) -> ContainerServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        subprocess.run([docker_cli(), "rm", "-f", self.name], capture_output=True, timeout=120)
