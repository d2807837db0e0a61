"""``make demo``: train on MovieLens-100k, serve with the local Feature Store, print recommendations.

Steps: train (unless ``OUT/model`` exists), start the local Feature Store server, create the item
and user-history feature groups and fill them, serve the model (in Docker when an engine answers,
else the same ``serve`` entrypoint on the host) with ``FEATURE_GROUP_NAME`` and
``USER_HISTORY_FEATURE_GROUP_NAME`` set, call ``/invocations`` for a few users, record an event
for one of them with ``python -m training events put`` and show their recommendations before and
after it, and stop everything.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REGION = "us-east-1"
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo"}
REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local_test.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--retrain", action="store_true", help="train even if OUT/model exists")
    parser.add_argument("--host", action="store_true", help="serve on the host even if Docker answers")
    parser.add_argument("--image", default="twostage-rec:demo")
    args = parser.parse_args(argv)

    out: Path = args.out.resolve()
    model_dir = out / "model"
    from twostage_rec.artifact import MANIFEST, load_artifact

    if args.retrain or not (model_dir / MANIFEST).is_file():
        _step(f"training on {args.dataset} into {out}")
        _run([sys.executable, "-m", "training", "run", "--dataset", args.dataset, "--out", str(out)])
    else:
        _step(f"using the model in {model_dir} (--retrain to train again)")

    artifact = load_artifact(model_dir)
    from twostage_rec.server import free_local_port

    group = artifact.manifest.feature_store.feature_group_name
    docker = None if args.host else _docker()

    with contextlib.ExitStack() as stack:
        fs_url = stack.enter_context(_feature_store(out / "feature-store.db"))
        history_group = _ingest(artifact, fs_url)
        env = {
            "FEATURE_GROUP_NAME": group,
            "USER_HISTORY_FEATURE_GROUP_NAME": history_group,
            "FEATURE_STORE_ENDPOINT_URL": fs_url,
            "AWS_REGION": REGION,
            **DUMMY_CREDENTIALS,
        }
        port = free_local_port()
        if docker:
            stack.enter_context(_container(docker, args.image, model_dir, port, env))
        else:
            _step("no Docker engine answered: serving on the host with the same `serve` entrypoint")
            stack.enter_context(_host_server(out, port, env))
        _show(port, artifact, args.dataset)
        _fresh_event(port, artifact, args.dataset, history_group, fs_url)
    return 0


def _show(port: int, artifact: Any, dataset: str) -> None:
    titles = _titles(dataset)
    field = artifact.manifest.item_id_field
    users = artifact.user_ids[:3]
    for user_id in users:
        status, body = _invoke(port, {"user_id": user_id, "top_k": 5})
        _print_answer(body, field, titles)
    _step("a batch of two users and an unknown user (popularity fallback), one call")
    status, body = _invoke(port, {"instances": [{"user_id": users[0], "top_k": 3}, {"user_id": "new-user", "top_k": 3}]})
    for answer in body["predictions"]:
        _print_answer(answer, field, titles)
    _step("a new user who just watched two films (recent_items in the request): history-based, no fallback")
    status, body = _invoke(port, {"user_id": "new-user", "top_k": 3, "recent_items": list(artifact.item_ids[:2])})
    _print_answer(body, field, titles)
    _step("a bad request answers 400 with a JSON error")
    status, body = _invoke(port, {"user_id": users[0], "top_k": 0})
    print(f"  HTTP {status}: {json.dumps(body)}")


def _fresh_event(port: int, artifact: Any, dataset: str, history_group: str, fs_url: str) -> None:
    """Record that a user just interacted with their top recommendation; show the next answer."""
    titles = _titles(dataset)
    field = artifact.manifest.item_id_field
    user_id = artifact.user_ids[0]
    _, before = _invoke(port, {"user_id": user_id, "top_k": 5})
    item_id = before["recommendations"][0][field]
    _step(f"user {user_id} watches {item_id} {titles.get(item_id, '')}: recording the event in Feature Store")
    command = [sys.executable, "-m", "training", "events", "put", "--feature-group", history_group,
               "--user-id", user_id, "--item-id", item_id, "--region", REGION, "--endpoint-url", fs_url,
               "--history-length", str(artifact.manifest.history_length), "--no-progress"]
    print("  $ python -m training events put --feature-group", history_group, "--user-id", user_id,
          "--item-id", item_id, "...")
    _run(command, env={**os.environ, **DUMMY_CREDENTIALS})
    written = time.monotonic()
    _, after = _invoke(port, {"user_id": user_id, "top_k": 5})
    elapsed_ms = (time.monotonic() - written) * 1000.0
    _step(f"user {user_id} before and after the event (the next request, {elapsed_ms:.0f} ms after the write)")
    rows = zip(before["recommendations"], after["recommendations"])
    for old, new in rows:
        print(f"  {old['rank']:>2}. {_label(old[field], titles):<44} | {_label(new[field], titles)}")
    print(f"  {item_id} is now in the user's history: never recommended again, and its neighbours count most.")


def _label(item_id: str, titles: dict[str, str]) -> str:
    return f"{item_id} {titles.get(item_id, '')}"[:44]


def _print_answer(body: dict[str, Any], field: str, titles: dict[str, str]) -> None:
    flags = f"fallback={body['fallback']} degraded={body['degraded']}"
    if body.get("ignored_recent_items"):
        flags += f" ignored_recent_items={body['ignored_recent_items']}"
    print(f"\nuser {body['user_id']}  ({flags}, {body['timings_ms']['total']:.1f} ms in the handler)")
    for rec in body["recommendations"]:
        item_id = rec[field]
        rating = rec["predicted_rating"]
        shown = "  -  " if rating is None else f"{rating:4.2f}"
        print(f"  {rec['rank']:>2}. {shown}  {item_id:<12} {titles.get(item_id, '')}")


def _titles(dataset: str) -> dict[str, str]:
    try:
        from training.datasets import load_dataset

        items = load_dataset(dataset).items
    except Exception:  # noqa: BLE001 - titles are decoration; never fail the demo for them
        return {}
    if "title" not in items.columns:
        return {}
    return dict(zip(items["item_id"], items["title"].fillna("")))


@contextlib.contextmanager
def _feature_store(db: Path) -> Iterator[str]:
    _step("starting the local Feature Store server")
    db.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "local_test.feature_store", "serve", "--port", "0", "--db", str(db)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        line = proc.stdout.readline().strip() if proc.stdout else ""
        if not line.startswith("Feature Store listening on "):
            raise SystemExit(f"demo: the local Feature Store did not start ({line or 'no output'})")
        url = line.rsplit(" ", 1)[-1]
        print(f"  {url}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _ingest(artifact: Any, fs_url: str) -> str:
    """Create both feature groups and fill them; return the user-history group's name."""
    from training.feature_store import (
        create_item_feature_group,
        create_user_history_group,
        ingest_items,
        make_clients,
        seed_user_histories,
        user_history_schema,
    )

    os.environ.update({k: v for k, v in DUMMY_CREDENTIALS.items() if k not in os.environ})
    sagemaker, runtime = make_clients(REGION, fs_url)
    name = create_item_feature_group(sagemaker, artifact)
    _step(f"ingesting {artifact.manifest.n_items} item records into feature group {name}")
    ingest_items(runtime, artifact)
    history = user_history_schema(artifact.manifest)
    create_user_history_group(sagemaker, history)
    _step(f"seeding {artifact.manifest.n_users} users' last {artifact.manifest.history_length} items "
          f"into feature group {history.feature_group_name}")
    report = seed_user_histories(runtime, artifact, history)
    if not report.ok:
        raise SystemExit(f"demo: {report.events_failed} history events could not be stored")
    return history.feature_group_name


@contextlib.contextmanager
def _container(docker: str, image: str, model_dir: Path, port: int, env: dict[str, str]) -> Iterator[None]:
    _step(f"building the serving image {image}")
    _run([docker, "build", "-q", "-t", image, str(REPO)], env={**os.environ, "DOCKER_BUILDKIT": "1"})
    # The image runs as an unprivileged user; the mount is read-only.
    _run(["chmod", "-R", "a+rX", str(model_dir)])
    name = f"twostage-demo-{os.getpid()}"
    _step(f"docker run {image} serve (container {name}, host network, port {port})")
    env_args = [a for k, v in {**env, "SAGEMAKER_BIND_TO_PORT": str(port)}.items() for a in ("-e", f"{k}={v}")]
    # Host networking lets the container reach the Feature Store on the host's loopback.
    _run([docker, "run", "-d", "--rm", "--name", name, "--network", "host",
          "-v", f"{model_dir}:/opt/ml/model:ro", *env_args, image, "serve"], quiet=True)
    try:
        _wait_ready(port, lambda: subprocess.run([docker, "logs", name], check=False))
        yield
    finally:
        subprocess.run([docker, "stop", "-t", "30", name], check=False, capture_output=True)


@contextlib.contextmanager
def _host_server(out: Path, port: int, env: dict[str, str]) -> Iterator[None]:
    serve = shutil.which("serve", path=str(Path(sys.executable).parent)) or "serve"
    proc = subprocess.Popen(
        [serve],
        env={**os.environ, **env, "SAGEMAKER_BASE_DIR": str(out), "SAGEMAKER_BIND_TO_PORT": str(port),
             "SAGEMAKER_MODEL_SERVER_WORKERS": "1"},
        start_new_session=True,
    )
    try:
        _wait_ready(port, lambda: None, proc)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def _wait_ready(port: int, on_failure: Any, proc: subprocess.Popen[bytes] | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"demo: serve exited with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    on_failure()
    raise SystemExit(f"demo: the server did not answer /ping on port {port} within {timeout:.0f} s")


def _invoke(port: int, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    # MMS answers /ping before the workers are up: retry the first call briefly.
    for attempt in range(60):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/invocations", json.dumps(payload), {"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        if response.status not in (502, 503) or attempt == 59:
            return response.status, json.loads(body)
        time.sleep(0.5)
    raise AssertionError("unreachable")


def _docker() -> str | None:
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and subprocess.run([candidate, "info"], capture_output=True).returncode == 0:
            return candidate
    return None


def _run(cmd: list[str], env: dict[str, str] | None = None, quiet: bool = False) -> None:
    result = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL if quiet else None)
    if result.returncode != 0:
        raise SystemExit(f"demo: `{' '.join(cmd[:3])} ...` failed with status {result.returncode}")


def _step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
