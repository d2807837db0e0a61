"""build_and_push.sh: the dry run's printed commands, and the real sequence against fake aws/docker."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "build_and_push.sh"
SHA = r"[0-9a-f]{7,}(?:-dirty)?"  # a dirty tree is tagged <sha>-dirty

FAKE_AWS = """#!/usr/bin/env bash
echo "aws $*" >> "$CALLS"
case "$1 $2" in
  "sts get-caller-identity") echo 111122223333 ;;
  "ecr describe-repositories") [ -n "${REPO_EXISTS:-}" ] || { echo "RepositoryNotFoundException" >&2; exit 254; } ;;
  "ecr create-repository") echo '{"repository": {}}' ;;
  "ecr get-login-password") echo s3cret ;;
  "configure get") exit 1 ;;
esac
"""
FAKE_DOCKER = """#!/usr/bin/env bash
if [ "$1" = login ]; then echo "docker $* <<< $(cat)" >> "$CALLS"; exit 0; fi
echo "docker $* [DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-}]" >> "$CALLS"
"""


@pytest.fixture
def fakes(tmp_path: Path) -> dict[str, str]:
    """Environment with fake aws and docker executables that append their calls to $CALLS."""
    for name, text in (("aws", FAKE_AWS), ("docker", FAKE_DOCKER)):
        path = tmp_path / name
        path.write_text(text)
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in ("BASE_IMAGE", "DOCKER_BUILDKIT")}
    return {**env, "AWS_CLI": str(tmp_path / "aws"), "DOCKER_CLI": str(tmp_path / "docker"),
            "CALLS": str(tmp_path / "calls.log")}  # fmt: skip


def run(env: dict[str, str], *args: str, script: Path = SCRIPT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)


def calls(env: dict[str, str]) -> list[str]:
    path = Path(env["CALLS"])
    return path.read_text().splitlines() if path.exists() else []


def test_dry_run_prints_every_command_and_runs_none(fakes: dict[str, str]) -> None:
    result = run(fakes, "myrec", "--region", "eu-west-1", "--dry-run")

    assert result.returncode == 0, result.stderr
    assert calls(fakes) == []  # neither aws nor docker was executed
    aws, docker = fakes["AWS_CLI"], fakes["DOCKER_CLI"]
    registry = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
    expected = [
        r"# dry run: nothing below is executed",
        rf"{aws} sts get-caller-identity --query Account --output text",
        rf"{aws} ecr describe-repositories --repository-names myrec --region eu-west-1 >/dev/null"
        rf" \|\| {aws} ecr create-repository --repository-name myrec --region eu-west-1"
        r" --image-scanning-configuration scanOnPush=true",
        rf"{aws} ecr get-login-password --region eu-west-1 \| {docker} login --username AWS --password-stdin {registry}",
        rf"DOCKER_BUILDKIT=1 {docker} build -t {registry}/myrec:({SHA}) -t {registry}/myrec:latest"
        rf" -f {ROOT}/Dockerfile {ROOT}",
        rf"{docker} push {registry}/myrec:({SHA})",
        rf"{docker} push {registry}/myrec:latest",
    ]
    lines = result.stdout.splitlines()
    assert len(lines) == len(expected), result.stdout
    shas = set()
    for pattern, line in zip(expected, lines):
        match = re.fullmatch(pattern, line)
        assert match, f"{line!r} does not match {pattern!r}"
        shas.update(match.groups())
    assert len(shas) == 1  # one sha tag for the build and the push


def test_dry_run_without_aws_uses_placeholders_and_passes_base_image(fakes: dict[str, str]) -> None:
    env = {**fakes, "AWS_CLI": "/nonexistent/aws", "BASE_IMAGE": "debian:bookworm-slim"}
    result = run(env, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "# no region configured; the dry run uses us-east-1" in result.stdout
    assert "123456789012.dkr.ecr.us-east-1.amazonaws.com/twostage-rec:latest" in result.stdout
    assert "build --build-arg BASE_IMAGE=debian:bookworm-slim -t" in result.stdout


def test_real_run_creates_the_repository_logs_in_builds_and_pushes_both_tags(fakes: dict[str, str]) -> None:
    result = run(fakes, "myrec", "--region=eu-west-1")

    assert result.returncode == 0, result.stderr
    registry = "111122223333.dkr.ecr.eu-west-1.amazonaws.com"
    log = calls(fakes)
    assert log[:5] == [
        "aws sts get-caller-identity --query Account --output text",
        "aws ecr describe-repositories --repository-names myrec --region eu-west-1",
        "aws ecr create-repository --repository-name myrec --region eu-west-1 --image-scanning-configuration scanOnPush=true",
        "aws ecr get-login-password --region eu-west-1",
        f"docker login --username AWS --password-stdin {registry} <<< s3cret",
    ]
    build, push_sha, push_latest = log[5:]
    sha = re.fullmatch(rf"docker build -t {registry}/myrec:({SHA}) -t {registry}/myrec:latest -f {ROOT}/Dockerfile"
                       rf" {ROOT} \[DOCKER_BUILDKIT=1\]", build)  # fmt: skip
    assert sha, build
    assert push_sha == f"docker push {registry}/myrec:{sha.group(1)} [DOCKER_BUILDKIT=]"
    assert push_latest == f"docker push {registry}/myrec:latest [DOCKER_BUILDKIT=]"
    assert result.stdout.strip().endswith(f"pushed {registry}/myrec:{sha.group(1)}")


def test_an_existing_repository_is_not_created_again(fakes: dict[str, str]) -> None:
    result = run({**fakes, "REPO_EXISTS": "1", "AWS_REGION": "us-west-2"})
    assert result.returncode == 0, result.stderr
    log = calls(fakes)
    assert "aws ecr describe-repositories --repository-names twostage-rec --region us-west-2" in log
    assert not any("create-repository" in line for line in log)


def test_usage_errors_exit_2(fakes: dict[str, str]) -> None:
    result = run(fakes, "--bogus")
    assert result.returncode == 2
    assert "unknown option --bogus" in result.stderr and "usage:" in result.stderr
    result = run(fakes)  # real run, no region anywhere (the fake `aws configure get region` fails)
    assert result.returncode == 2
    assert "no region; pass --region or set AWS_REGION" in result.stderr
    assert calls(fakes) == ["aws configure get region"]


def test_outside_a_git_checkout_the_script_says_so(fakes: dict[str, str], tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "build_and_push.sh"
    copy.parent.mkdir()
    shutil.copy(SCRIPT, copy)
    env = {**fakes, "GIT_CEILING_DIRECTORIES": str(tmp_path)}  # never find a repository above tmp_path
    result = run(env, "--dry-run", "--region", "eu-west-1", script=copy)
    assert result.returncode == 1
    assert "is not a git checkout" in result.stderr
