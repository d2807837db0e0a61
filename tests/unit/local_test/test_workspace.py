from __future__ import annotations

from pathlib import Path

import pytest

from local_test.workspace import REPO, NotebookError, Workspace


def workspace(env: dict[str, str], credentials: bool = False) -> Workspace:
    return Workspace.from_environment(env, credentials_found=lambda: credentials)


AWS = {"TWOSTAGE_ROLE_ARN": "arn:aws:iam::123456789012:role/SageMaker", "TWOSTAGE_BUCKET": "recs",
       "AWS_REGION": "eu-west-1"}


def test_local_defaults() -> None:
    ws = workspace({})
    assert (ws.target, ws.region, ws.dataset, ws.serve) == ("local", "us-east-1", "ml-100k", "auto")
    assert ws.out == REPO / "out" / "notebooks" and ws.model_dir == ws.out / "model"
    assert (ws.item_feature_group, ws.user_history_group) == ("twostage-ml-100k-items", "twostage-ml-100k-user-history")
    assert ws.train_args == () and not ws.is_aws
    assert "the local server" in ws.describe()


def test_aws_needs_credentials_and_configuration() -> None:
    assert workspace(AWS, credentials=True).target == "aws"
    assert workspace(AWS, credentials=False).reason == "no AWS credentials found"
    # credentials alone (a laptop's personal profile) stay local, without asking boto3
    ws = Workspace.from_environment({"AWS_REGION": "eu-west-1"}, credentials_found=lambda: pytest.fail("asked"))
    assert ws.target == "local" and ws.region == "eu-west-1"


def test_aws_target_reads_its_settings() -> None:
    ws = workspace({**AWS, "TWOSTAGE_IMAGE_URI": "1.dkr.ecr/x:1", "FEATURE_GROUP_NAME": "items",
                    "USER_HISTORY_FEATURE_GROUP_NAME": "hist", "TWOSTAGE_ENDPOINT_NAME": "recs"}, credentials=True)
    assert (ws.region, ws.bucket, ws.image_uri, ws.endpoint_name) == ("eu-west-1", "recs", "1.dkr.ecr/x:1", "recs")
    assert (ws.item_feature_group, ws.user_history_group) == ("items", "hist")
    assert "role" in ws.describe() and "bucket" in ws.describe()


def test_forced_aws_target_names_what_is_missing() -> None:
    with pytest.raises(NotebookError, match="TWOSTAGE_BUCKET") as caught:
        workspace({"TWOSTAGE_TARGET": "aws", "AWS_REGION": "eu-west-1", "TWOSTAGE_ROLE_ARN": "arn"})
    assert "TWOSTAGE_ROLE_ARN" not in str(caught.value)


@pytest.mark.parametrize("name", ["TWOSTAGE_TARGET", "TWOSTAGE_SERVE", "TWOSTAGE_DATASET"])
def test_bad_choice_is_one_line(name: str) -> None:
    with pytest.raises(NotebookError, match=name):
        workspace({name: "nonsense"})


def test_train_args_and_output_folder() -> None:
    ws = workspace({"TWOSTAGE_TRAIN_ARGS": "--no-ablations --sequence-epochs 3", "TWOSTAGE_NOTEBOOK_OUT": "runs/x",
                    "TWOSTAGE_SERVE": "host"})
    assert ws.train_args == ("--no-ablations", "--sequence-epochs", "3")
    assert ws.out == REPO / "runs" / "x" and ws.serve == "host"
    assert workspace({"TWOSTAGE_NOTEBOOK_OUT": "/tmp/nb"}).out == Path("/tmp/nb")
    with pytest.raises(NotebookError, match="TWOSTAGE_TRAIN_ARGS"):
        workspace({"TWOSTAGE_TRAIN_ARGS": "'unclosed"})


def test_require_model_names_the_notebook_that_trains(tmp_path: Path, tiny_model_dir: Path) -> None:
    ws = workspace({"TWOSTAGE_NOTEBOOK_OUT": str(tmp_path)})
    with pytest.raises(NotebookError, match="run 01-train-retrieval.ipynb first"):
        ws.require_model()
    (tmp_path / "model").symlink_to(tiny_model_dir)
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(NotebookError, match="ranker_sample.csv"):
        ws.require_model()
    (tmp_path / "ranker_sample.csv").write_text("user_id\n")
    assert ws.require_model() == tmp_path / "model"


def test_require_names_the_variable() -> None:
    with pytest.raises(NotebookError, match="TWOSTAGE_IMAGE_URI"):
        workspace(AWS, credentials=True).require("image_uri")


def test_ipython_shows_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))  # no profile in the home folder
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell(config=config)
    shown: list[list[str]] = []
    shell._showtraceback = lambda etype, value, stb: shown.append(stb)  # what ipykernel sends as the error
    shell.user_ns["NotebookError"] = NotebookError
    shell.run_cell("raise NotebookError('no trained model: run 01-train-retrieval.ipynb first')")
    assert shown == [["NotebookError: no trained model: run 01-train-retrieval.ipynb first"]]
