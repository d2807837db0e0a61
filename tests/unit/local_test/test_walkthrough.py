from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from local_test import walkthrough
from local_test.workspace import NotebookError, Workspace

AWS = {"TWOSTAGE_ROLE_ARN": "arn:role", "TWOSTAGE_BUCKET": "recs", "AWS_REGION": "eu-west-1",
       "TWOSTAGE_IMAGE_URI": "1.dkr.ecr/twostage-rec:1"}


def aws_workspace(out: Path, **extra: str) -> Workspace:
    return Workspace.from_environment({**AWS, "TWOSTAGE_NOTEBOOK_OUT": str(out), **extra}, credentials_found=lambda: True)


def trained(out: Path, model_dir: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "model").symlink_to(model_dir)
    (out / "metrics.json").write_text("{}")
    (out / "ranker_sample.csv").write_text("user_id,item_id,as_of,label\n1,2,2020-01-01T00:00:00Z,4\n")


def test_run_command_echoes_and_fails_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    script = "import sys; print('a'); print('10%\\r50%\\r100%'); sys.exit(3)"
    with pytest.raises(NotebookError) as caught:
        walkthrough.run_command([sys.executable, "-c", script])
    assert capsys.readouterr().out == "a\n100%\n"  # a progress bar shows its last state
    assert "failed with status 3" in str(caught.value) and "\n" not in str(caught.value)
    assert walkthrough.run_command([sys.executable, "-c", "print('x')"]) == "x"


def test_load_data_failure_names_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    from training import datasets

    def unavailable(name: str, **_: Any) -> Any:
        raise datasets.DataError("pip could not download recbole==1.2.1")

    monkeypatch.setattr(datasets, "load_dataset", unavailable)
    with pytest.raises(NotebookError, match="run 00-setup.ipynb first"):
        walkthrough.load_data(Workspace.from_environment({}, credentials_found=lambda: False))


def test_summaries_of_a_small_dataset() -> None:
    from training.datasets import load_dataset

    dataset = load_dataset("synthetic", n_users=30, n_items=40, interactions_per_user=8)
    facts = walkthrough.data_summary(dataset)["value"]
    assert facts["interactions"] == "240" and facts["users"] == "30"
    split = walkthrough.split_summary(dataset)
    assert list(split.index) == ["train", "validation", "test"]
    assert split["interactions"].sum() == 240 and split.loc["test", "users"] == 30


def test_recommendations_table_adds_titles() -> None:
    recs = [{"item_id": "7", "predicted_rating": 4.5, "score": 0.3, "rank": 1},
            {"item_id": "9", "predicted_rating": None, "score": 0.1, "rank": 2}]
    table = walkthrough.recommendations_table({"u1": recs}, "item_id", {"7": "Heat (1995)"})
    assert table.loc[("u1", 1), "title"] == "Heat (1995)" and table.loc[("u1", 2), "title"] == ""
    assert list(table.columns) == ["item_id", "title", "predicted_rating", "score"]


def test_plot_latency_marks_median_and_p99() -> None:
    import numpy as np
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    walkthrough.plot_latency(np.arange(1.0, 101.0), ax, " (host endpoint)")
    assert [line.get_label() for line in ax.get_lines()] == ["p50 50.5 ms", "p99 99.0 ms"]
    assert ax.get_title() == "100 sequential requests (host endpoint)"


class FakeRuntime:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def invoke_endpoint(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        body = {"user_id": json.loads(kwargs["Body"])["user_id"], "recommendations": []}
        return {"Body": io.BytesIO(json.dumps(body).encode())}


class FakeSageMaker:
    class exceptions:  # noqa: N801 - boto3's spelling
        class ResourceNotFound(Exception):
            pass

    def __init__(self) -> None:
        self.deleted: list[str] = []

    def describe_feature_group(self, FeatureGroupName: str) -> dict[str, str]:  # noqa: N803
        return {"FeatureGroupStatus": "Created"}

    def delete_feature_group(self, FeatureGroupName: str) -> None:  # noqa: N803
        self.deleted.append(FeatureGroupName)


def test_aws_endpoint_deploys_invokes_and_tears_down(tmp_path: Path, tiny_model_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The AWS path with fake clients: the commands it runs and the calls it makes (no AWS here)."""
    import boto3

    ws = aws_workspace(tmp_path / "out")
    trained(ws.out, tiny_model_dir)
    commands: list[tuple[str, ...]] = []

    def cli(*args: str, env: Any = None) -> str:
        commands.append(args)
        return '{"user_id": "alice"}\nrecs-20260101-120000' if args[0] == "deploy" else ""

    sagemaker, runtime = FakeSageMaker(), FakeRuntime()
    monkeypatch.setattr(walkthrough, "run_cli", cli)
    monkeypatch.setattr(walkthrough, "_sagemaker_client", lambda ws, url: sagemaker)
    monkeypatch.setattr(boto3.session.Session, "client", lambda self, name, **kw: runtime)

    endpoint = walkthrough.start_endpoint(ws)
    deploy = commands[0]
    assert deploy[0] == "deploy" and endpoint.name == "recs-20260101-120000" and endpoint.kind == "sagemaker"
    flags = dict(zip(deploy[1::2], deploy[2::2]))
    assert flags["--image-uri"] == AWS["TWOSTAGE_IMAGE_URI"] and flags["--bucket"] == "recs"
    assert flags["--model-tar"] == str(ws.model_tar) and flags["--region"] == "eu-west-1"
    assert (flags["--feature-group-name"], flags["--user-history-group-name"]) == endpoint.groups
    assert endpoint.invoke({"user_id": "alice"})["user_id"] == "alice"
    assert runtime.calls[0]["EndpointName"] == "recs-20260101-120000"

    done = walkthrough.teardown(ws, endpoint)
    assert commands[-1] == ("teardown", "--endpoint-name", "recs-20260101-120000", "--region", "eu-west-1")
    assert sagemaker.deleted == list(endpoint.groups) and len(done) == 3


def test_aws_endpoint_needs_an_image(tmp_path: Path, tiny_model_dir: Path) -> None:
    ws = Workspace.from_environment({**AWS, "TWOSTAGE_IMAGE_URI": "", "TWOSTAGE_NOTEBOOK_OUT": str(tmp_path)},
                                    credentials_found=lambda: True)
    trained(ws.out, tiny_model_dir)
    with pytest.raises(NotebookError, match="TWOSTAGE_IMAGE_URI"):
        walkthrough.start_endpoint(ws)


def test_error_answers_are_one_line() -> None:
    endpoint = walkthrough.Endpoint("sagemaker", None, ("a", "b"), name="recs", runtime=None)

    from botocore.exceptions import ClientError

    class Failing:
        def invoke_endpoint(self, **_: Any) -> None:
            raise ClientError({"Error": {"Code": "ModelError", "Message": "bad top_k"}, "OriginalStatusCode": 400},
                              "InvokeEndpoint")

    endpoint.runtime = Failing()
    with pytest.raises(NotebookError, match="HTTP 400"):
        endpoint.invoke({"user_id": "x", "top_k": 0})
