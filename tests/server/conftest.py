"""The real ``serve`` on this host: one multi-model-server for the whole session.

Only one MMS may run on a host at a time, so every test that needs a server shares the
session-scoped ``server``; tests that must never start MMS use ``harness.run_serve``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.server.harness import (
    MAX_REQUEST_BYTES,
    SERVE_SCRIPT,
    Server,
    free_port,
    kill_tree,
    serve_env,
    stop,
    wait_until_ready,
)

if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("multi-model-server needs Java", allow_module_level=True)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Server]:
    base_dir = tmp_path_factory.mktemp("serve")
    shutil.copytree(tiny_model_dir, base_dir / "model")
    hooks_dir = base_dir / "hooks"
    hooks_dir.mkdir()
    port = free_port()
    output_path = base_dir / "serve.log"
    env = serve_env(base_dir, port, MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES), TWOSTAGE_TEST_HOOKS=str(hooks_dir))
    started = time.monotonic()
    with output_path.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, str(SERVE_SCRIPT)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, so teardown can kill everything it started
        )
    running = Server(process, port, base_dir, hooks_dir, output_path)
    try:
        wait_until_ready(running)
    except BaseException:
        kill_tree(process.pid)
        raise
    running.startup_s = time.monotonic() - started
    running.descendants = psutil.Process(process.pid).children(recursive=True)
    yield running
    stop(running)  # SIGTERM, measured; kills whatever is left even if it fails
