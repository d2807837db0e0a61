"""Fixtures for the container tests: the image (built once per session), the tiny model, containers.

Every test here is skipped, with the reason, when no Docker engine answers. Set
``TWOSTAGE_TEST_IMAGE`` to test an image that is already built instead of building one.
Only containers started here are removed, by their unique names.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.container.harness import ROOT, Container, docker, docker_cli


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """The docker CLI, or a skip with the reason when no engine answers."""
    try:
        info = subprocess.run([docker_cli(), "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"container tests need a Docker engine: {docker_cli()} info: {exc}")
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["no answer"])[-1]
        pytest.skip(f"container tests need a Docker engine: {docker_cli()} info: {reason}")
    return docker_cli()


@pytest.fixture(scope="session")
def image(docker_engine: str) -> Iterator[str]:
    """The serving image built from this checkout (or ``$TWOSTAGE_TEST_IMAGE``), untagged at the end."""
    prebuilt = os.environ.get("TWOSTAGE_TEST_IMAGE")
    if prebuilt:
        yield prebuilt
        return
    tag = f"twostage-rec:test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    build = subprocess.run(
        [docker_engine, "build", "-t", tag, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
    )
    if build.returncode != 0:
        pytest.fail(f"docker build failed:\n{(build.stdout + build.stderr)[-4000:]}")
    print(f"\n[container] built {tag} in {time.monotonic() - started:.1f} s")
    yield tag
    docker("rmi", tag, check=False)


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny model readable by the image's unprivileged user (pytest's folders are 0700)."""
    copy = tmp_path_factory.mktemp("container-model") / "model"
    shutil.copytree(tiny_model_dir, copy)
    copy.chmod(0o755)
    for path in copy.iterdir():
        path.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    return copy


@pytest.fixture
def start_container(image: str, model_dir: Path) -> Iterator[Any]:
    """Factory: ``start_container(env={...}, extra_args=[...], port=8080)``; each container is removed after the test."""
    started: list[Container] = []

    def start(env: Mapping[str, str] | None = None, extra_args: Sequence[str] = (), port: int = 8080) -> Container:
        container = Container(image, model_dir, dict(env or {}), tuple(extra_args), port)
        started.append(container)
        return container.start()

    yield start
    for container in started:
        container.remove()
