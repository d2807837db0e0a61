"""Helpers for tests and scripts: the server as a subprocess, boto3 clients, a contract checker.

    with FeatureStoreServer() as feature_store:
        sagemaker, runtime = make_clients(feature_store.endpoint_url)
        ...
        feature_store.set_faults(throttle_rate=1.0)
        assert feature_store.stats()["BatchGetRecord"] == 3

boto3 is imported lazily so the server itself stays standard-library only.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final

_REPO_ROOT: Final = Path(__file__).resolve().parents[2]
_READY_RE: Final = re.compile(r"Feature Store listening on (http://\S+)")


class FeatureStoreServer:
    """The local Feature Store run as ``python -m local_test.feature_store serve`` in a subprocess.

    ``db_path`` None keeps the database in a temporary directory removed on exit. ``restart``
    reuses the port and the database, so clients and their ``endpoint_url`` stay valid.
    """

    def __init__(self, db_path: str | Path | None = None, *, faults: Mapping[str, float] | None = None,
                 startup_timeout: float = 30.0) -> None:
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if db_path is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="feature-store-")
            db_path = Path(self._tmpdir.name, "feature_store.sqlite")
        self.db_path = Path(db_path)
        self._fault_args = [arg for key, value in (faults or {}).items()
                            for arg in (f"--{key.replace('_', '-')}", str(value))]
        self._startup_timeout = startup_timeout
        self._port = 0
        self._process: subprocess.Popen[str] | None = None
        self.endpoint_url = ""

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs (for CPU accounting in benchmarks)."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def start(self) -> FeatureStoreServer:
        """Start the subprocess and wait for its ``listening`` line."""
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError(f"the local Feature Store is already running at {self.endpoint_url}")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "local_test.feature_store", "serve",
                   "--port", str(self._port), "--db", str(self.db_path), *self._fault_args]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
        assert self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], self._startup_timeout)
        line = self._process.stdout.readline() if ready else ""
        match = _READY_RE.fullmatch(line.strip())
        if match is None:
            self.kill()
            status = self._process.returncode
            raise RuntimeError(f"the local Feature Store did not start (exit status {status}); it printed {line!r}")
        self.endpoint_url = match.group(1)
        self._port = int(self.endpoint_url.rsplit(":", 1)[1])
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); return the exit status."""
        if self._process is None:
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._close_pipe()
        return self._process.returncode

    def kill(self) -> None:
        """SIGKILL the server at once, as a crash would."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._close_pipe()

    def restart(self) -> FeatureStoreServer:
        """Stop (if still running) and start again on the same port with the same database."""
        self.stop()
        return self.start()

    def _close_pipe(self) -> None:
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()

    def _admin(self, method: str, route: str, payload: Mapping[str, Any] | None = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(f"{self.endpoint_url}/_admin/{route}", data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            raise ValueError(json.load(error).get("message", str(error))) from None

    def set_faults(self, **settings: float) -> dict[str, Any]:
        """Replace the fault settings (see ``FaultConfig``); return them as the server holds them."""
        return self._admin("POST", "faults", settings)

    def clear_faults(self) -> dict[str, Any]:
        """Turn every fault off."""
        return self._admin("DELETE", "faults")

    def stats(self) -> dict[str, int]:
        """Requests per operation since start (or the last ``reset_stats``)."""
        return self._admin("GET", "stats")

    def reset_stats(self) -> None:
        """Zero the server's request counters."""
        self._admin("DELETE", "stats")

    def __enter__(self) -> FeatureStoreServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()


def make_clients(endpoint_url: str, region: str = "us-east-1", config: Any = None) -> tuple[Any, Any]:
    """(``sagemaker`` client, ``sagemaker-featurestore-runtime`` client) with dummy credentials.

    ``config`` is a ``botocore.config.Config``; the default retries in standard mode, 3 attempts.
    """
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name=region)
    config = config or Config(retries={"mode": "standard", "total_max_attempts": 3}, connect_timeout=2, read_timeout=10)
    return (session.client("sagemaker", endpoint_url=endpoint_url, config=config),
            session.client("sagemaker-featurestore-runtime", endpoint_url=endpoint_url, config=config))


def shape_errors(shape: Any, value: Any, path: str = "$") -> list[str]:
    """Where a decoded JSON ``value`` breaks a botocore ``shape``: missing or unknown members, wrong types."""
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        errors = [f"{path}.{name}: required member missing" for name in shape.required_members if name not in value]
        for key, item in value.items():
            member = shape.members.get(key)
            if member is None:
                errors.append(f"{path}.{key}: not a member of {shape.name}")
            else:
                errors += shape_errors(member, item, f"{path}.{key}")
        return errors
    if kind == "list":
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [error for i, item in enumerate(value) for error in shape_errors(shape.member, item, f"{path}[{i}]")]
    if kind == "map":
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        return [error for k, v in value.items() for error in shape_errors(shape.value, v, f"{path}.{k}")]
    expected: dict[str, tuple[type, ...]] = {
        "string": (str,), "blob": (str,), "boolean": (bool,), "integer": (int,), "long": (int,),
        "float": (int, float), "double": (int, float), "timestamp": (int, float, str),
    }
    if not isinstance(value, expected.get(kind, (object,))) or (isinstance(value, bool) and kind != "boolean"):
        return [f"{path}: expected {kind}, got {type(value).__name__} {value!r}"]
    if kind == "string" and shape.enum and value not in shape.enum:
        return [f"{path}: {value!r} is not one of {shape.enum}"]
    return []


def watch_contract(client: Any) -> list[str]:
    """Check every response ``client`` receives against botocore's model, before botocore parses it.

    Returns the list that collects violations (it keeps filling as the client is used): 2xx bodies
    must match the operation's output shape exactly; errors need ``x-amzn-ErrorType`` and a message.
    """
    violations: list[str] = []

    def check(operation_model: Any, response_dict: Mapping[str, Any], **_: Any) -> None:
        name, status = operation_model.name, response_dict["status_code"]
        try:
            payload = json.loads(response_dict["body"] or b"{}")
        except ValueError:
            violations.append(f"{name}: HTTP {status} body is not JSON")
            return
        if status >= 300:
            if not response_dict["headers"].get("x-amzn-ErrorType") or not isinstance(payload.get("message"), str):
                violations.append(f"{name}: HTTP {status} error lacks x-amzn-ErrorType or message: {payload}")
        elif operation_model.output_shape is not None:
            violations.extend(f"{name}: {error}" for error in shape_errors(operation_model.output_shape, payload))

    client.meta.events.register(f"before-parse.{client.meta.service_model.service_id.hyphenize()}", check)
    return violations
