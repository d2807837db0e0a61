"""``make demo``: train on MovieLens-100k, serve with the local Feature Store, print recommendations.

Steps: train (unless ``OUT/model`` exists), start the local Feature Store server, create the item
and user-history feature groups and fill them, serve the model (in Docker when an engine answers,
else the same ``serve`` entrypoint on the host) with ``FEATURE_GROUP_NAME`` and
``USER_HISTORY_FEATURE_GROUP_NAME`` set, call ``/invocations`` for a few users, record an event
for one of them with ``python -m training events put`` and show their recommendations before and
after it, and stop everything. The pieces live in ``local_test/endpoint.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from local_test.endpoint import (
    DUMMY_CREDENTIALS,
    REGION,
    EndpointError,
    container,
    docker_engine,
    events_put_command,
    feature_store_server,
    host_server,
    invoke,
    run,
    setup_feature_groups,
    step,
    titles,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local_test.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--retrain", action="store_true", help="train even if OUT/model exists")
    parser.add_argument("--host", action="store_true", help="serve on the host even if Docker answers")
    parser.add_argument("--image", default="twostage-rec:demo")
    args = parser.parse_args(argv)
    try:
        return _demo(args)
    except EndpointError as exc:
        raise SystemExit(f"demo: {exc}") from None


def _demo(args: argparse.Namespace) -> int:
    out: Path = args.out.resolve()
    model_dir = out / "model"
    from twostage_rec.artifact import MANIFEST, load_artifact

    if args.retrain or not (model_dir / MANIFEST).is_file():
        step(f"training on {args.dataset} into {out}")
        # No ablations or replay: they retrain the ranker, or the whole model, only to explain it
        # (`make train` prints the whole report); the demo's job is the served answers.
        run([sys.executable, "-m", "training", "run", "--dataset", args.dataset, "--out", str(out),
             "--no-ablations", "--no-replay"])
    else:
        step(f"using the model in {model_dir} (--retrain to train again)")

    artifact = load_artifact(model_dir)
    from twostage_rec.server import free_local_port

    group = artifact.manifest.feature_store.feature_group_name
    docker = None if args.host else docker_engine()

    with contextlib.ExitStack() as stack:
        fs_url = stack.enter_context(feature_store_server(out / "feature-store.db"))
        history_group = setup_feature_groups(artifact, fs_url)
        env = {
            "FEATURE_GROUP_NAME": group,
            "USER_HISTORY_FEATURE_GROUP_NAME": history_group,
            "FEATURE_STORE_ENDPOINT_URL": fs_url,
            "AWS_REGION": REGION,
            **DUMMY_CREDENTIALS,
        }
        port = free_local_port()
        if docker:
            stack.enter_context(container(docker, args.image, model_dir, port, env))
        else:
            step("no Docker engine answered: serving on the host with the same `serve` entrypoint")
            stack.enter_context(host_server(out, port, env))
        _show(port, artifact, args.dataset)
        _fresh_event(port, artifact, args.dataset, history_group, fs_url)
    return 0


def _show(port: int, artifact: Any, dataset: str) -> None:
    names = titles(dataset)
    field = artifact.manifest.item_id_field
    users = artifact.user_ids[:3]
    for user_id in users:
        status, body = invoke(port, {"user_id": user_id, "top_k": 5})
        _print_answer(body, field, names)
    step("a batch of two users and an unknown user (popularity fallback), one call")
    status, body = invoke(port, {"instances": [{"user_id": users[0], "top_k": 3}, {"user_id": "new-user", "top_k": 3}]})
    for answer in body["predictions"]:
        _print_answer(answer, field, names)
    step("a new user who just watched two films (recent_items in the request): history-based, no fallback")
    status, body = invoke(port, {"user_id": "new-user", "top_k": 3, "recent_items": list(artifact.item_ids[:2])})
    _print_answer(body, field, names)
    last = int(artifact.seen_timestamps[int(artifact.seen_indptr[1]) - 1])  # the first user's last interaction
    when = datetime.fromtimestamp(last, timezone.utc).isoformat()
    step(f"a backtest: user {users[0]} as of their last interaction, {when} (as_of: nothing later is used)")
    status, body = invoke(port, {"user_id": users[0], "top_k": 3, "as_of": when})
    _print_answer(body, field, names)
    step("a bad request answers 400 with a JSON error")
    status, body = invoke(port, {"user_id": users[0], "top_k": 0})
    print(f"  HTTP {status}: {json.dumps(body)}")


def _fresh_event(port: int, artifact: Any, dataset: str, history_group: str, fs_url: str) -> None:
    """Record that a user just interacted with their top recommendation; show the next answer."""
    names = titles(dataset)
    field = artifact.manifest.item_id_field
    user_id = artifact.user_ids[0]
    _, before = invoke(port, {"user_id": user_id, "top_k": 5})
    item_id = before["recommendations"][0][field]
    step(f"user {user_id} watches {item_id} {names.get(item_id, '')}: recording the event in Feature Store")
    command = events_put_command(history_group, user_id, item_id, REGION, artifact.manifest.history_length, fs_url)
    print("  $ python -m training events put --feature-group", history_group, "--user-id", user_id,
          "--item-id", item_id, "...")
    run(command, env={**os.environ, **DUMMY_CREDENTIALS})
    written = time.monotonic()
    _, after = invoke(port, {"user_id": user_id, "top_k": 5})
    elapsed_ms = (time.monotonic() - written) * 1000.0
    step(f"user {user_id} before and after the event (the next request, {elapsed_ms:.0f} ms after the write)")
    rows = zip(before["recommendations"], after["recommendations"])
    for old, new in rows:
        print(f"  {old['rank']:>2}. {_label(old[field], names):<44} | {_label(new[field], names)}")
    print(f"  {item_id} is now in the user's history: never recommended again, and its neighbours count most.")


def _label(item_id: str, names: dict[str, str]) -> str:
    return f"{item_id} {names.get(item_id, '')}"[:44]


def _print_answer(body: dict[str, Any], field: str, names: dict[str, str]) -> None:
    flags = f"fallback={body['fallback']} degraded={body['degraded']}"
    if body.get("ignored_recent_items"):
        flags += f" ignored_recent_items={body['ignored_recent_items']}"
    print(f"\nuser {body['user_id']}  ({flags}, {body['timings_ms']['total']:.1f} ms in the handler)")
    for rec in body["recommendations"]:
        item_id = rec[field]
        rating = rec["predicted_rating"]
        shown = "  -  " if rating is None else f"{rating:4.2f}"
        print(f"  {rec['rank']:>2}. {shown}  {item_id:<12} {names.get(item_id, '')}")


if __name__ == "__main__":
    sys.exit(main())
