"""The notebooks' steps (``notebooks/0*.ipynb``): each cell calls one of these, the CLI or the library.

Every step works on both targets of :class:`local_test.workspace.Workspace`: locally it starts the
local Feature Store server and a local endpoint (``local_test/endpoint.py``, what ``make demo``
uses); on AWS it calls the same CLI commands without ``--endpoint-url`` and deploys with
``python -m training deploy``. A missing prerequisite or a failed step raises
:class:`~local_test.workspace.NotebookError`, shown as one line.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from local_test.workspace import RANKER, REPO, SETUP, NotebookError, Workspace

LOCAL_IMAGE = "twostage-rec:notebook"


# --- commands ------------------------------------------------------------------------------------


def run_command(command: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """Run ``command`` in the repository, echoing its output (stderr merged in) line by line as it
    comes; return that output. A failure is one line naming the command."""
    proc = subprocess.Popen(list(command), cwd=REPO, env=dict(env) if env is not None else None,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    assert proc.stdout is not None
    for raw in proc.stdout:  # bytes: lines end at "\n" only, so a progress bar's "\r" updates stay one line
        shown = raw.decode("utf-8", errors="replace").rstrip("\r\n").rsplit("\r", 1)[-1]
        print(shown, flush=True)
        lines.append(shown)
    if proc.wait() != 0:
        shown = " ".join(command[1:4]) if command[:1] == [sys.executable] else " ".join(command[:3])
        raise NotebookError(f"`{shown} ...` failed with status {proc.returncode} (its output is above)")
    return "\n".join(lines)


def run_cli(*args: str, env: Mapping[str, str] | None = None) -> str:
    """``python -m training ARGS`` (the project's CLI) with the kernel's Python."""
    return run_command([sys.executable, "-m", "training", *args], env)


def cli_env(ws: Workspace) -> dict[str, str] | None:
    """The CLI's environment: locally, dummy credentials for the local Feature Store."""
    if ws.is_aws:
        return None
    from local_test.endpoint import DUMMY_CREDENTIALS

    return {**os.environ, **DUMMY_CREDENTIALS}


def connection_args(ws: Workspace, endpoint_url: str | None) -> list[str]:
    """``--region`` and, for the local Feature Store, ``--endpoint-url``."""
    return ["--region", ws.region, *(["--endpoint-url", endpoint_url] if endpoint_url else [])]


# --- 00 setup ------------------------------------------------------------------------------------


def check(ws: Workspace) -> list[str]:
    """What this machine offers the target: one line each."""
    ws.out.mkdir(parents=True, exist_ok=True)
    if ws.is_aws:
        return _check_aws(ws)
    from local_test.endpoint import docker_engine

    docker = docker_engine() if ws.serve != "host" else None
    java = shutil.which("java") is not None
    return [
        f"output folder {ws.out}: ready",
        f"Docker engine: {'answers, 03 serves in a container' if docker else 'none used, 03 serves on the host'}",
        f"Java (multi-model-server's frontend, for the host `serve`): {'found' if java else 'MISSING'}",
    ]


def _check_aws(ws: Workspace) -> list[str]:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    session = boto3.session.Session(region_name=ws.region)
    try:
        identity = session.client("sts", region_name=ws.region).get_caller_identity()["Arn"]
        session.client("s3", region_name=ws.region).head_bucket(Bucket=ws.bucket)
    except (BotoCoreError, ClientError) as exc:
        raise NotebookError(f"AWS check failed: {exc}") from None
    return [
        f"caller: {identity}",
        f"bucket s3://{ws.bucket}: reachable",
        f"serving image: {ws.image_uri or 'TWOSTAGE_IMAGE_URI unset (03 needs it: ./build_and_push.sh)'}",
    ]


def load_data(ws: Workspace) -> Any:
    """The workspace's dataset (MovieLens is downloaded once into the cache by 00)."""
    from training.datasets import DataError, load_dataset

    try:
        return load_dataset(ws.dataset)
    except DataError as exc:
        raise NotebookError(f"{ws.dataset} could not be loaded ({exc}): run {SETUP} first") from None


def data_summary(dataset: Any) -> Any:
    """Counts, rating scale and time span of a dataset, as a one-row-per-fact table."""
    import pandas as pd

    inter = dataset.interactions
    span = pd.to_datetime(inter["timestamp"].agg(["min", "max"]), unit="s", utc=True).dt.date
    facts = {
        "interactions": f"{len(inter):,}",
        "users": f"{inter['user_id'].nunique():,}",
        "items (interacted with)": f"{inter['item_id'].nunique():,}",
        "items (catalog)": f"{len(dataset.items):,}",
        "ratings": f"{dataset.rating_scale[0]:g} to {dataset.rating_scale[1]:g}",
        "time span": f"{span['min']} to {span['max']}",
    }
    return pd.DataFrame({"value": facts})


# --- 01 train ------------------------------------------------------------------------------------


def split_summary(dataset: Any) -> Any:
    """The temporal leave-last-out split the training run uses: rows, users and dates per part."""
    import pandas as pd

    from training.split import leave_last_out

    split = leave_last_out(dataset.interactions)
    rows = {}
    for name, frame in (("train", split.train), ("validation", split.validation), ("test", split.test)):
        times = pd.to_datetime(frame["timestamp"], unit="s", utc=True)
        rows[name] = {"interactions": len(frame), "users": frame["user_id"].nunique(),
                      "first": times.min().date(), "last": times.max().date()}
    return pd.DataFrame(rows).T


def train(ws: Workspace) -> None:
    """``python -m training run``: both stages, the baselines, the evaluation and the artifact."""
    run_cli("run", "--dataset", ws.dataset, "--out", str(ws.out), "--no-progress",
            "--feature-group", ws.item_feature_group, "--user-history-group", ws.user_history_group,
            *ws.train_args)


def metrics(ws: Workspace) -> dict[str, Any]:
    """``metrics.json`` of the trained model (or a one-line error naming 01)."""
    ws.require_model()
    return json.loads(ws.metrics_path.read_text(encoding="utf-8"))


# --- 02 ranker -----------------------------------------------------------------------------------


def ranker_sample(ws: Workspace) -> Any:
    """``ranker_sample.csv``: a few ranker-period queries' candidate rows with their as-of times."""
    import pandas as pd

    ws.require_model()
    return pd.read_csv(ws.ranker_sample_path, dtype={"user_id": str, "item_id": str}, parse_dates=["as_of"])


@contextlib.contextmanager
def feature_store(ws: Workspace) -> Iterator[str | None]:
    """The Feature Store's endpoint URL: locally the local server (stopped on exit); None on AWS."""
    if ws.is_aws:
        yield None
        return
    from local_test.endpoint import EndpointError, feature_store_server

    try:
        with feature_store_server(ws.feature_store_db) as url:
            yield url
    except EndpointError as exc:
        raise NotebookError(str(exc)) from None


def publish_features(ws: Workspace) -> None:
    """``python -m training feature-store setup``: create both groups, ingest items, seed histories."""
    ws.require_model()
    role = ["--role-arn", ws.role_arn] if ws.role_arn else []
    with feature_store(ws) as url:
        run_cli("feature-store", "setup", "--model", str(ws.model_dir), *connection_args(ws, url), *role,
                env=cli_env(ws))


def feature_groups(ws: Workspace) -> tuple[str, str]:
    """(item group, user-history group) as the model's manifest names them."""
    from twostage_rec.artifact import read_manifest

    manifest = read_manifest(ws.require_model())
    history = manifest.user_history.feature_group_name if manifest.user_history else ws.user_history_group
    return manifest.feature_store.feature_group_name, history


def require_feature_groups(ws: Workspace, endpoint_url: str | None) -> tuple[str, str]:
    """Both groups exist (else a one-line error naming 02); returns their names."""
    groups = feature_groups(ws)
    sagemaker = _sagemaker_client(ws, endpoint_url)
    for name in groups:
        try:
            sagemaker.describe_feature_group(FeatureGroupName=name)
        except sagemaker.exceptions.ResourceNotFound:
            raise NotebookError(f"feature group {name} does not exist: run {RANKER} first") from None
    return groups


def _sagemaker_client(ws: Workspace, endpoint_url: str | None) -> Any:
    if endpoint_url:
        from local_test.feature_store.testing import make_clients

        return make_clients(endpoint_url, ws.region)[0]
    import boto3

    return boto3.session.Session(region_name=ws.region).client("sagemaker", region_name=ws.region)


# --- 03 inference --------------------------------------------------------------------------------


def titles(ws: Workspace) -> dict[str, str]:
    from local_test.endpoint import titles as dataset_titles

    return dataset_titles(ws.dataset)


def recommendations_table(answers: Mapping[str, Sequence[Mapping[str, Any]]], field: str,
                          names: Mapping[str, str]) -> Any:
    """One row per (user, rank): item id, title, predicted rating, score."""
    import pandas as pd

    rows = [{"user_id": user, "rank": rec["rank"], field: rec[field], "title": names.get(rec[field], ""),
             "predicted_rating": rec["predicted_rating"], "score": rec["score"]}
            for user, recs in answers.items() for rec in recs]
    return pd.DataFrame(rows).set_index(["user_id", "rank"])


@dataclass
class Endpoint:
    """A running endpoint: local (``port``) or SageMaker (``name``); ``close`` stops or deletes it."""

    kind: str  # "docker", "host" or "sagemaker"
    feature_store_url: str | None  # the local Feature Store's URL; None on AWS
    groups: tuple[str, str]  # (item group, user-history group)
    port: int | None = None
    name: str | None = None
    runtime: Any = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def invoke(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """POST a request to ``/invocations``; the decoded answer (an error status is a NotebookError)."""
        if self.port is not None:
            from local_test.endpoint import invoke

            status, body = invoke(self.port, dict(payload))
        else:
            status, body = _invoke_sagemaker(self.runtime, self.name, payload)
        if status != 200:
            raise NotebookError(f"the endpoint answered HTTP {status}: {body.get('message', body)}")
        return body

    def close(self) -> None:
        self._stack.close()


def start_endpoint(ws: Workspace) -> Endpoint:
    """Locally: the local Feature Store and ``serve`` (Docker when an engine answers, else the host),
    stopped by ``close()`` or when the kernel exits. On AWS: ``python -m training deploy``."""
    ws.require_model()
    if ws.is_aws:
        return _deploy(ws)
    from local_test.endpoint import DUMMY_CREDENTIALS, EndpointError, container, docker_engine, host_server, step
    from twostage_rec.server import free_local_port

    stack = contextlib.ExitStack()
    atexit.register(stack.close)  # a kernel that stops mid-notebook stops the server too
    try:
        url = stack.enter_context(feature_store(ws))
        groups = require_feature_groups(ws, url)
        env = {"FEATURE_GROUP_NAME": groups[0], "USER_HISTORY_FEATURE_GROUP_NAME": groups[1],
               "FEATURE_STORE_ENDPOINT_URL": url, "AWS_REGION": ws.region, **DUMMY_CREDENTIALS}
        docker = None if ws.serve == "host" else docker_engine()
        if ws.serve == "docker" and docker is None:
            raise NotebookError("TWOSTAGE_SERVE=docker, but no Docker engine answers `docker info`")
        port = free_local_port()
        if docker:
            stack.enter_context(container(docker, LOCAL_IMAGE, ws.model_dir, port, env))
        else:
            why = "TWOSTAGE_SERVE=host" if ws.serve == "host" else "no Docker engine answered"
            step(f"{why}: serving on the host with the same `serve` entrypoint")
            stack.enter_context(host_server(ws.out, port, env, log=ws.out / "serve.log"))
    except EndpointError as exc:
        stack.close()
        raise NotebookError(str(exc)) from None
    except BaseException:
        stack.close()
        raise
    print(f"  endpoint: http://127.0.0.1:{port}/invocations" + ("" if docker else f", log {ws.out / 'serve.log'}"))
    return Endpoint("docker" if docker else "host", url, groups, port=port, _stack=stack)


def _deploy(ws: Workspace) -> Endpoint:
    """``python -m training deploy``: S3 upload, Model, EndpointConfig, Endpoint (minutes)."""
    import boto3

    ws.require("image_uri")
    groups = require_feature_groups(ws, None)
    output = run_cli("deploy", "--name", ws.endpoint_name, "--image-uri", str(ws.image_uri),
                     "--model-tar", str(ws.model_tar), "--bucket", str(ws.bucket), "--role-arn", str(ws.role_arn),
                     "--region", ws.region, "--feature-group-name", groups[0],
                     "--user-history-group-name", groups[1])
    name = output.strip().splitlines()[-1]  # deploy prints the sample answer, then the endpoint name
    runtime = boto3.session.Session(region_name=ws.region).client("sagemaker-runtime", region_name=ws.region)
    endpoint = Endpoint("sagemaker", None, groups, name=name, runtime=runtime)
    endpoint._stack.callback(run_cli, "teardown", "--endpoint-name", name, "--region", ws.region)
    return endpoint


def _invoke_sagemaker(runtime: Any, name: str | None, payload: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    from botocore.exceptions import ClientError

    try:
        response = runtime.invoke_endpoint(EndpointName=name, ContentType="application/json",
                                           Accept="application/json", Body=json.dumps(payload).encode("utf-8"))
    except ClientError as exc:  # the container's 4xx/5xx arrive as ModelError with the original status
        status = int(exc.response.get("OriginalStatusCode", 500))
        return status, {"message": exc.response.get("Error", {}).get("Message", str(exc))}
    return 200, json.loads(response["Body"].read())


def measure_latency(endpoint: Endpoint, user_ids: Sequence[str], requests: int = 200, top_k: int = 10) -> Any:
    """Round-trip milliseconds of ``requests`` sequential calls, cycling through ``user_ids``."""
    import numpy as np

    endpoint.invoke({"user_id": user_ids[0], "top_k": top_k})  # warm-up, not measured
    ms = np.empty(requests)
    for i in range(requests):
        started = time.perf_counter()
        endpoint.invoke({"user_id": user_ids[i % len(user_ids)], "top_k": top_k})
        ms[i] = (time.perf_counter() - started) * 1000.0
    return ms


def plot_latency(ms: Any, ax: Any, where: str = "") -> None:
    """A histogram of request latency with its median and 99th percentile marked."""
    import numpy as np

    p50, p99 = np.percentile(ms, [50, 99])
    ax.hist(ms, bins=40, color="tab:blue")
    for value, label, style in ((p50, "p50", "-"), (p99, "p99", "--")):
        ax.axvline(value, color="tab:orange", linestyle=style, label=f"{label} {value:.1f} ms")
    ax.set_xlabel("round trip per /invocations call (ms)")
    ax.set_ylabel("requests")
    ax.set_title(f"{len(ms)} sequential requests{where}")
    ax.legend()


def record_event(ws: Workspace, endpoint: Endpoint, user_id: str, names: Mapping[str, str],
                 top_k: int = 5) -> Any:
    """The user watches their top recommendation: record it with ``python -m training events put``
    and return the recommendations before and after, side by side."""
    import pandas as pd

    from local_test.endpoint import events_put_command
    from twostage_rec.artifact import read_manifest

    manifest = read_manifest(ws.model_dir)
    field = manifest.item_id_field
    before = endpoint.invoke({"user_id": user_id, "top_k": top_k})["recommendations"]
    item_id = before[0][field]
    print(f"user {user_id} watches {item_id} {names.get(item_id, '')}")
    run_command(events_put_command(endpoint.groups[1], user_id, item_id, ws.region, manifest.history_length,
                                   endpoint.feature_store_url), cli_env(ws))
    after = endpoint.invoke({"user_id": user_id, "top_k": top_k})["recommendations"]

    def label(rec: Mapping[str, Any]) -> str:
        return f"{rec[field]} {names.get(rec[field], '')}".strip()

    return pd.DataFrame({"before": [label(r) for r in before], "after": [label(r) for r in after]},
                        index=pd.RangeIndex(1, len(before) + 1, name="rank"))


def teardown(ws: Workspace, endpoint: Endpoint | None) -> list[str]:
    """Stop (local) or delete (AWS: ``python -m training teardown``) the endpoint; on AWS also delete
    both feature groups. The local Feature Store's groups stay in its database file."""
    done = []
    if endpoint is not None:
        endpoint.close()
        done.append(f"{endpoint.kind} endpoint {'deleted' if ws.is_aws else 'stopped'}")
    if ws.is_aws:
        sagemaker = _sagemaker_client(ws, None)
        for name in feature_groups(ws):
            with contextlib.suppress(sagemaker.exceptions.ResourceNotFound):
                sagemaker.delete_feature_group(FeatureGroupName=name)
                done.append(f"feature group {name} deleted")
    return done
