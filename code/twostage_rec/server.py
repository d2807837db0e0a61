"""The ``serve`` entrypoint: validate and warm up the model, then run multi-model-server.

MMS answers ``/ping`` with 200 before (and whether or not) its workers load the model, so
everything that can fail is checked here first: the settings, the artifact with its checksums,
and one real recommendation through ``input_fn``/``predict_fn``/``output_fn``. A failure is one
line on stderr and a non-zero exit; MMS is never started.

MMS is then started the way ``sagemaker_inference.model_server`` and the ``multi-model-server``
CLI do it, but without them: the toolkit always writes ``/etc/sagemaker-mms.properties`` and
puts the management API on the public port, and the CLI drops Java's exit status and leaves
Java running when it is killed. Here the config file, the log4j config and the worker sockets
live in a run folder (``$SAGEMAKER_BASE_DIR/.sagemaker`` when that is set, else a fresh
temporary folder), Java runs in its own process group, SIGTERM/SIGINT are forwarded to that
group, and ``serve`` exits with Java's status. The handler service contract is the toolkit's
(:mod:`twostage_rec.handler_service`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import mms

from twostage_rec.artifact import ArtifactError
from twostage_rec.content_types import JSON
from twostage_rec.errors import RecommenderError
from twostage_rec.handler import input_fn, load_service, output_fn, predict_fn
from twostage_rec.settings import Settings, SettingsError, available_cpus, env_integer

HANDLER_SERVICE: Final = "twostage_rec.handler_service"
MODEL_NAME: Final = "model"
MMS_MAX_PORT: Final = 32766  # MMS refuses any higher port ("Invalid port number")
DEFAULT_VMARGS: Final = "-XX:+UseContainerSupport -XX:MaxRAMPercentage=10 -XX:+ExitOnOutOfMemoryError -XX:-UsePerfData"
# Our handler answers bodies up to MAX_REQUEST_BYTES with its own JSON 413; MMS must let them
# through, and refuses (its own 413) only beyond this margin, which bounds the Java heap per request.
REQUEST_SIZE_MARGIN: Final = 1024 * 1024
MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024
_UNIX_SOCKET_PATH_MAX: Final = 100  # sun_path holds 108 bytes; MMS appends /.mms.sock.<port>
# Request workers get SIGTERM this long before MMS does (see _stop_model_server). Measured on this
# host, 2 workers: with it, 14 stops of 14 kept every worker's metrics; without it, 5 of 9 lost
# some or all of them.
METRICS_FLUSH_S: Final = 0.2

# Console only (the container's stdout is its log). Access logs and metrics at WARN: a line per
# request is noise at production rates. MMS logs each line of a worker's stderr at WARN, so our
# own logs (every error with its request id) always pass. It logs each line of a worker's stdout
# at INFO to WorkerLifeCycle's logger: of those, the CloudWatch EMF records (lines starting with
# {"_aws":, twostage_rec.request_metrics) are printed bare, since CloudWatch only extracts metrics
# from a log event that is the JSON object alone; the other stdout lines stay below the threshold.
LOG4J2_XML: Final = """\
<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
    <Appenders>
        <Console name="STDOUT" target="SYSTEM_OUT">
            <PatternLayout pattern="%d{ISO8601} [%-5p] %c - %m%n"/>
        </Console>
        <Console name="EMF" target="SYSTEM_OUT">
            <PatternLayout pattern="%m%n"/>
            <Filters>
                <ThresholdFilter level="warn" onMatch="DENY" onMismatch="NEUTRAL"/>
                <RegexFilter regex="[{]&quot;_aws&quot;:.*" onMatch="ACCEPT" onMismatch="DENY"/>
            </Filters>
        </Console>
    </Appenders>
    <Loggers>
        <Logger name="com.amazonaws.ml.mms.wlm.WorkerLifeCycle" level="info" additivity="false">
            <AppenderRef ref="EMF"/>
            <AppenderRef ref="STDOUT" level="warn"/>
        </Logger>
        <Logger name="ACCESS_LOG" level="warn"/>
        <Logger name="MODEL_LOG" level="warn"/>
        <Logger name="MODEL_METRICS" level="warn"/>
        <Logger name="MMS_METRICS" level="warn"/>
        <Logger name="com.amazonaws.ml.mms" level="warn"/>
        <Logger name="com.amazonaws.ml.mms.metrics" level="error"/>
        <Logger name="io.netty" level="error"/>
        <Logger name="org.apache" level="off"/>
        <Root level="warn">
            <AppenderRef ref="STDOUT"/>
        </Root>
    </Loggers>
</Configuration>
"""


class ServeError(Exception):
    """The server cannot start; the message is one line naming the variable or file."""


@dataclass(frozen=True)
class ServerConfig:
    """Where and how multi-model-server runs, from ``SAGEMAKER_*`` environment variables."""

    model_dir: Path
    run_dir: Path
    port: int
    workers: int
    timeout_s: int
    startup_timeout_s: int
    vmargs: tuple[str, ...]
    drain_s: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerConfig:
        env = os.environ if environ is None else environ
        base = env.get("SAGEMAKER_BASE_DIR")
        # The toolkit's SAGEMAKER_MODEL_SERVER_TIMEOUT is in minutes; the _SECONDS one wins.
        minutes = env_integer(env, "SAGEMAKER_MODEL_SERVER_TIMEOUT", 1, 1, 60)
        return cls(
            model_dir=Path(base or "/opt/ml") / "model",
            port=env_integer(env, "SAGEMAKER_BIND_TO_PORT", 8080, 1, MMS_MAX_PORT),
            workers=env_integer(env, "SAGEMAKER_MODEL_SERVER_WORKERS", available_cpus(), 1, 256),
            timeout_s=env_integer(env, "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS", 60 * minutes, 1, 3600),
            startup_timeout_s=env_integer(env, "SAGEMAKER_STARTUP_TIMEOUT", 600, 1, 3600),
            vmargs=tuple((env.get("SAGEMAKER_MODEL_SERVER_VMARGS") or DEFAULT_VMARGS).split()),
            drain_s=env_integer(env, "SERVE_DRAIN_SECONDS", 0, 0, 300),
            # Without SAGEMAKER_BASE_DIR we are in the SageMaker container, where /opt/ml may be
            # read-only. Evaluated last, so a bad variable above leaves no temporary folder.
            run_dir=Path(base) / ".sagemaker" if base else Path(tempfile.mkdtemp(prefix="serve-")),
        )


def main() -> int:
    """Console script ``serve``: preflight, then run MMS in the foreground until it exits."""
    try:
        settings = Settings.from_env()
        config = ServerConfig.from_env()
        warm_up = preflight(config.model_dir, settings)
    except (ArtifactError, SettingsError, ServeError) as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # e.g. XGBoost refusing the ranker: still one line, no traceback
        first_line = (str(exc).strip().splitlines() or [""])[0]
        print(f"serve: the model failed its preflight: {type(exc).__name__}: {first_line}", file=sys.stderr)
        return 1
    try:
        return run_model_server(config, settings, warm_up)
    except ServeError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1


@dataclass(frozen=True)
class WarmUp:
    """What the preflight proved works: the model version and a request it answered."""

    model_version: str
    body: bytes


def preflight(model_dir: Path, settings: Settings) -> WarmUp:
    """Load the artifact with checksums and answer one request for its first user.

    Goes through the same ``input_fn``/``predict_fn``/``output_fn`` as the workers. Raises
    :class:`ArtifactError` or :class:`ServeError` with one clear line.
    """
    if not model_dir.is_dir():
        raise ServeError(f"{model_dir}: model directory not found; set SAGEMAKER_BASE_DIR or mount the model")
    legacy = [p for p in model_dir.rglob("*") if p.name.lower() == "manifest.json"]
    if legacy:
        # MMS reads any such file as its own legacy manifest and fails to start without a word.
        raise ServeError(f"{legacy[0]}: multi-model-server cannot load a model folder holding MANIFEST.json")
    service = load_service(model_dir, settings, verify_checksums=True)
    user_ids = service.recommender.artifact.user_ids
    if not user_ids:
        raise ArtifactError(f"{model_dir}: the artifact has no users to warm up with")
    body = json.dumps({"user_id": user_ids[0]}).encode("utf-8")
    try:
        output_fn(predict_fn(input_fn(body, JSON), service), JSON)
    except RecommenderError as exc:
        raise ServeError(f"warm-up recommendation for user {user_ids[0]!r} failed: {exc.message}") from None
    return WarmUp(service.recommender.model_version, body)


def write_mms_config(config: ServerConfig, settings: Settings, management_port: int) -> tuple[Path, Path]:
    """Write ``config.properties`` and ``log4j2.xml`` into the run folder and return their paths."""
    properties = {
        "inference_address": f"http://0.0.0.0:{config.port}",
        # The management API can unregister the model: keep it off the public interface.
        "management_address": f"http://127.0.0.1:{management_port}",
        "model_store": str(config.model_dir.parent),
        "default_service_handler": HANDLER_SERVICE,
        "default_workers_per_model": str(config.workers),
        # One Python process loads the model, then forks a request process per worker: the
        # workers share that one load, and a crashed one is re-forked without reloading.
        "preload_model": "true",
        "default_response_timeout_seconds": str(config.timeout_s),  # wins over the minutes-based key
        "max_request_size": str(settings.max_request_bytes + REQUEST_SIZE_MARGIN),
        "max_response_size": str(MAX_RESPONSE_BYTES),
        # Decoding would json.loads the body in MMS's socket code: malformed JSON kills the worker.
        "decode_input_request": "false",
        # This file is the one source of truth; MMS_* variables would silently override it.
        "enable_envvars_config": "false",
        "async_logging": "true",
    }
    config.run_dir.mkdir(parents=True, exist_ok=True)
    config_path = config.run_dir / "config.properties"
    config_path.write_text("".join(f"{k}={v}\n" for k, v in properties.items()), encoding="utf-8")
    log_config_path = config.run_dir / "log4j2.xml"
    log_config_path.write_text(LOG4J2_XML, encoding="utf-8")
    return config_path, log_config_path


def mms_command(config: ServerConfig, config_path: Path, log_config_path: Path, temp_dir: Path) -> list[str]:
    """The Java command line ``multi-model-server --start`` would build for this config."""
    mms_home = Path(mms.__file__).resolve().parent.parent
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else "java"
    return [
        java,
        f"-Dmodel_server_home={mms_home}",
        f"-Dlog4j.configurationFile=file://{log_config_path}",
        f"-Djava.io.tmpdir={temp_dir}",
        *config.vmargs,
        "-cp",
        f".:{mms_home / 'mms' / 'frontend' / '*'}",
        "com.amazonaws.ml.mms.ModelServer",
        "--python",
        sys.executable,
        "-f",
        str(config_path),
        "-s",
        str(config.model_dir.parent),
        "-m",
        f"{MODEL_NAME}={config.model_dir.name}",
    ]


def run_model_server(config: ServerConfig, settings: Settings, warm_up: WarmUp) -> int:
    """Run MMS until it exits; forward SIGTERM/SIGINT; return its exit status."""
    management_port = free_local_port()
    config_path, log_config_path = write_mms_config(config, settings, management_port)
    temp_dir = _socket_dir(config.run_dir)
    env = {
        # One BLAS/OpenMP thread per worker unless told otherwise: workers already take one core
        # each, and threaded matrix products of a few users fight over them (measured: a 10-user
        # batch retrieval 13.5 ms with default threading vs 1.6 ms with one thread, busy cores).
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        **os.environ,
        "TEMP": str(temp_dir),
        "TMPDIR": str(temp_dir),
        "MMS_DECODE_INPUT_REQUEST": "false",  # read by the workers' socket code itself
    }
    command = mms_command(config, config_path, log_config_path, temp_dir)
    try:
        java = subprocess.Popen(command, env=env, cwd=config.run_dir, start_new_session=True)
    except OSError as exc:
        print(f"serve: cannot start multi-model-server ({command[0]}): {exc.strerror}", file=sys.stderr)
        return 1

    draining: list[threading.Timer] = []
    flush = settings.metrics_enabled  # workers write their metrics on SIGTERM
    stopping = threading.Event()  # asked to stop: workers dying now is expected

    def forward(signo: int, _frame: object) -> None:
        stopping.set()
        # MMS closes every client connection ~0.3 s after SIGTERM. With SERVE_DRAIN_SECONDS the
        # first SIGTERM only starts a timer, so requests in flight finish; a second one is final.
        if signo == signal.SIGTERM and config.drain_s and not draining:
            print(f"serve: SIGTERM: draining for {config.drain_s} s before stopping", file=sys.stderr, flush=True)
            timer = threading.Timer(config.drain_s, _stop_model_server, (java.pid, signal.SIGTERM, flush))
            timer.daemon = True
            draining.append(timer)
            timer.start()
            return
        _stop_model_server(java.pid, signo, flush)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    ready, failed = threading.Event(), threading.Event()
    for target, args in (
        (_announce_when_ready, (java.pid, config, warm_up, ready, failed)),
        (_watch_workers, (java.pid, ready, stopping, failed)),
    ):
        threading.Thread(target=target, args=args, name=target.__name__, daemon=True).start()
    status = _wait_for(java.pid)
    java.returncode = status
    _stop_group(java.pid)
    return 1 if failed.is_set() else status


def _announce_when_ready(
    pgid: int, config: ServerConfig, warm_up: WarmUp, ready: threading.Event, failed: threading.Event
) -> None:
    """Print the ready line once MMS answers the warm-up request; stop MMS if it never does.

    Neither ``/ping`` nor the management API will do: both report a worker as soon as its Java
    thread runs, before the Python side has loaded the model.
    """
    request = urllib.request.Request(
        f"http://127.0.0.1:{config.port}/invocations", data=warm_up.body, headers={"Content-Type": JSON}
    )
    deadline = time.monotonic() + config.startup_timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
                response.read()
        except OSError:  # not listening yet, or 503 while no worker has loaded the model
            time.sleep(0.1)
            continue
        print(f"serving model {warm_up.model_version} on port {config.port} with {config.workers} workers", flush=True)
        ready.set()
        return
    message = f"serve: the model server did not answer the warm-up request within {config.startup_timeout_s} s"
    print(message, file=sys.stderr, flush=True)
    failed.set()
    _signal_group(pgid, signal.SIGTERM)


def _watch_workers(java_pid: int, ready: threading.Event, stopping: threading.Event, failed: threading.Event) -> None:
    """Stop the server when it can no longer serve: its workers are gone for good.

    multi-model-server 1.1.11 forks every worker from one Python backend process (itself a
    ``model_service_worker``) and never restarts that process: after it dies, a worker that dies
    is not replaced, and once none is left every request hangs until its timeout while ``/ping``
    still answers 200. Exiting lets the container be restarted instead.
    """
    while not stopping.wait(1.0):
        if not ready.is_set():
            continue
        if not any(_is_worker(pid) for pid in _group_processes(java_pid)) and not stopping.is_set():
            print(
                "serve: every model-server worker has died and multi-model-server cannot replace them "
                "(its Python backend is gone); stopping",
                file=sys.stderr,
                flush=True,
            )
            failed.set()
            _signal_group(java_pid, signal.SIGTERM)
            return


def _stop_model_server(pgid: int, signo: int, flush_metrics: bool) -> None:
    """Send ``signo`` to multi-model-server's group; with ``flush_metrics``, SIGTERM its request
    workers ``METRICS_FLUSH_S`` before.

    A worker writes its open metrics window on SIGTERM (:mod:`twostage_rec.request_metrics`), but
    MMS stops relaying a worker's output moments after its Java side gets the signal itself. MMS's
    own SIGTERM handler in a worker only removes its socket files: the worker keeps serving.
    """
    workers = [pid for pid in _group_processes(pgid) if _is_request_worker(pid)] if flush_metrics else []
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if workers:
        time.sleep(METRICS_FLUSH_S)
    _signal_group(pgid, signo)


def _group_processes(pgid: int) -> list[int]:
    """Every live (not zombie) process in process group ``pgid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        fields = _stat(entry) if entry.isdigit() else None
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after "pid (comm) ": state ppid pgrp ...; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _is_request_worker(pid: int) -> bool:
    """A worker that MMS's Python backend (itself a ``model_service_worker``) forked to serve requests."""
    fields = _stat(pid)
    return fields is not None and _is_worker(pid) and _is_worker(int(fields[1]))


def _is_worker(pid: int) -> bool:
    try:
        return b"model_service_worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_for(pid: int) -> int:
    """Wait for ``pid`` and return its exit status, reaping any other child on the way.

    As a container's PID 1, ``serve`` inherits orphaned worker processes and must reap them.
    """
    while True:
        try:
            reaped, wait_status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 1
        if reaped == pid:
            code = os.waitstatus_to_exitcode(wait_status)
            return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, like a shell


def _stop_group(pgid: int, grace_s: float = 10.0) -> None:
    """Java has exited: give its workers ``grace_s`` to follow, then kill what is left."""
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        _reap_children()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)
    _reap_children()


def _signal_group(pgid: int, signo: int) -> None:
    try:
        os.killpg(pgid, signo)
    except ProcessLookupError:
        pass


def _reap_children() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _socket_dir(run_dir: Path) -> Path:
    """Java's temp dir holds the workers' Unix sockets, whose path length is bounded."""
    candidate = run_dir / "tmp"
    if len(str(candidate / ".mms.sock.65535")) > _UNIX_SOCKET_PATH_MAX:
        return Path(tempfile.mkdtemp(prefix="mms-"))
    candidate.mkdir(exist_ok=True)
    return candidate


def free_local_port() -> int:
    """A free loopback port that MMS accepts (the kernel's own picks are all above its limit)."""
    for _ in range(200):
        port = random.randrange(20_000, MMS_MAX_PORT + 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise ServeError(f"no free port between 20000 and {MMS_MAX_PORT} on 127.0.0.1 for the MMS management API")


if __name__ == "__main__":
    sys.exit(main())
