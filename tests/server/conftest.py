"""The real ``serve`` on this host: one multi-model-server for the whole session.

Only one MMS may run on a host at a time, so every test that needs a server shares the
session-scoped ``server``; tests that must never start MMS use ``harness.run_serve``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.harness import MAX_REQUEST_BYTES, Server, free_port, serve_env, start, stop

if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("multi-model-server needs Java", allow_module_level=True)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Server]:
    base_dir = tmp_path_factory.mktemp("serve")
    shutil.copytree(tiny_model_dir, base_dir / "model")
    hooks_dir = base_dir / "hooks"
    hooks_dir.mkdir()
    port = free_port()
    env = serve_env(base_dir, port, MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES), TWOSTAGE_TEST_HOOKS=str(hooks_dir))
    running = start(base_dir, port, env)
    yield running
    stop(running)  # SIGTERM, measured; kills whatever is left even if it fails
