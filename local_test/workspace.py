"""The notebooks' settings: one frozen object built from the environment, and their one-line errors.

    from local_test.workspace import Workspace
    ws = Workspace.from_environment()

Two targets, decided here and nowhere else:

- ``local`` (the default, and whenever no AWS credentials are found): MovieLens-100k, the local
  Feature Store server (its database in the output folder), the output folder ``out/notebooks``,
  and a local endpoint (``docker run IMAGE serve`` when a Docker engine answers, else the host
  ``serve``).
- ``aws``: credentials resolve (boto3's usual chain), a region is set, and ``TWOSTAGE_BUCKET`` and
  ``TWOSTAGE_ROLE_ARN`` are set (or ``TWOSTAGE_TARGET=aws``): the real Feature Store, and a
  SageMaker endpoint created with ``python -m training deploy``. Credentials alone are not enough,
  so a laptop with a personal AWS profile stays local unless asked.

| variable | default | meaning |
|---|---|---|
| ``TWOSTAGE_TARGET`` | ``auto`` | ``local``, ``aws`` or ``auto`` (as above) |
| ``TWOSTAGE_DATASET`` | ``ml-100k`` | ``ml-100k``, ``ml-1m`` or ``synthetic`` |
| ``TWOSTAGE_NOTEBOOK_OUT`` | ``out/notebooks`` | output folder (relative paths: to the repository root) |
| ``TWOSTAGE_TRAIN_ARGS`` | | extra ``python -m training run`` arguments (the notebook test: ``--no-ablations --no-replay``) |
| ``TWOSTAGE_SERVE`` | ``auto`` | endpoint: ``auto`` (Docker when an engine answers), ``docker``, ``host`` (the test) |
| ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` | ``us-east-1`` locally | the region, passed explicitly to every client |
| ``TWOSTAGE_ROLE_ARN`` | | aws: SageMaker execution role (endpoint, feature groups) |
| ``TWOSTAGE_BUCKET`` | | aws: S3 bucket for ``model.tar.gz`` |
| ``TWOSTAGE_IMAGE_URI`` | | aws: the serving image in ECR (``./build_and_push.sh``), needed by 03 |
| ``TWOSTAGE_ENDPOINT_NAME`` | ``twostage-rec`` | aws: endpoint base name (``deploy`` appends a timestamp) |
| ``FEATURE_GROUP_NAME`` | ``twostage-<dataset>-items`` | the item feature group (the serving variable's name) |
| ``USER_HISTORY_FEATURE_GROUP_NAME`` | ``twostage-<dataset>-user-history`` | the user-history group |
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parent.parent
TARGETS: Final = ("auto", "local", "aws")
SERVE_MODES: Final = ("auto", "docker", "host")
DATASETS: Final = ("ml-100k", "ml-1m", "synthetic")  # the ones that need no input files
LOCAL_REGION: Final = "us-east-1"
# The four notebooks, in order: the one-line errors name the one to run first.
SETUP, TRAIN, RANKER, INFERENCE = ("00-setup.ipynb", "01-train-retrieval.ipynb", "02-train-ranker.ipynb",
                                   "03-inference.ipynb")


class NotebookError(Exception):
    """A prerequisite is missing or a step failed: IPython shows this message as one line, no traceback."""

    def _render_traceback_(self) -> list[str]:
        # IPython renders an exception through this method when it has one (ipykernel sends the
        # returned lines as the error output's traceback).
        return [f"{type(self).__name__}: {self}"]


@dataclass(frozen=True)
class Workspace:
    target: str  # "local" | "aws"
    reason: str  # why this target was chosen
    region: str
    dataset: str
    out: Path
    item_feature_group: str
    user_history_group: str
    train_args: tuple[str, ...] = ()
    serve: str = "auto"  # local endpoint: auto | docker | host
    role_arn: str | None = None
    bucket: str | None = None
    image_uri: str | None = None
    endpoint_name: str = "twostage-rec"

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, credentials_found: Callable[[], bool] | None = None
    ) -> Workspace:
        """Read the variables in the module docstring; ``credentials_found`` defaults to boto3's chain."""
        env = os.environ if environ is None else environ
        target = _choice(env, "TWOSTAGE_TARGET", TARGETS)
        dataset = _choice(env, "TWOSTAGE_DATASET", DATASETS)
        serve = _choice(env, "TWOSTAGE_SERVE", SERVE_MODES)
        role, bucket = env.get("TWOSTAGE_ROLE_ARN") or None, env.get("TWOSTAGE_BUCKET") or None
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        if target == "auto":
            target, reason = _auto_target(role, bucket, credentials_found or _boto3_credentials_found)
        else:
            reason = f"TWOSTAGE_TARGET={target}"
        if target == "aws":
            region = region or _boto3_region()
            missing = [name for name, value in (("AWS_REGION", region), ("TWOSTAGE_ROLE_ARN", role),
                                                ("TWOSTAGE_BUCKET", bucket)) if not value]
            if missing:
                raise NotebookError(f"the aws target needs {', '.join(missing)}: set them, or TWOSTAGE_TARGET=local")
        out = Path(env.get("TWOSTAGE_NOTEBOOK_OUT") or "out/notebooks")
        try:
            train_args = tuple(shlex.split(env.get("TWOSTAGE_TRAIN_ARGS", "")))
        except ValueError as exc:
            raise NotebookError(f"TWOSTAGE_TRAIN_ARGS: {exc}") from None
        return cls(
            target=target,
            reason=reason,
            region=region or LOCAL_REGION,
            dataset=dataset,
            out=out if out.is_absolute() else REPO / out,
            item_feature_group=env.get("FEATURE_GROUP_NAME") or f"twostage-{dataset}-items",
            user_history_group=env.get("USER_HISTORY_FEATURE_GROUP_NAME") or f"twostage-{dataset}-user-history",
            train_args=train_args,
            serve=serve,
            role_arn=role,
            bucket=bucket,
            image_uri=env.get("TWOSTAGE_IMAGE_URI") or None,
            endpoint_name=env.get("TWOSTAGE_ENDPOINT_NAME") or "twostage-rec",
        )

    @property
    def is_aws(self) -> bool:
        return self.target == "aws"

    @property
    def model_dir(self) -> Path:
        return self.out / "model"

    @property
    def model_tar(self) -> Path:
        return self.out / "model.tar.gz"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.json"

    @property
    def ranker_sample_path(self) -> Path:
        return self.out / "ranker_sample.csv"  # training.pipeline.RANKER_SAMPLE_FILE (not imported: torch)

    @property
    def feature_store_db(self) -> Path:
        """The local Feature Store server's database (local target)."""
        return self.out / "feature-store.db"

    def require_model(self) -> Path:
        """The model folder, or a one-line error naming the notebook that trains it."""
        from twostage_rec.artifact import MANIFEST

        for path in (self.model_dir / MANIFEST, self.metrics_path, self.ranker_sample_path):
            if not path.is_file():
                raise NotebookError(f"no trained model in {self.out} ({path.name} is missing): run {TRAIN} first")
        return self.model_dir

    def require(self, *fields: str) -> None:
        """A one-line error naming the variables of ``fields`` (e.g. ``image_uri``) that are unset."""
        missing = [f"TWOSTAGE_{name.upper()}" for name in fields if not getattr(self, name)]
        if missing:
            raise NotebookError(f"the {self.target} target needs {', '.join(missing)} for this step")

    def describe(self) -> str:
        rows = [
            ("target", f"{self.target} ({self.reason})"),
            ("region", self.region),
            ("dataset", self.dataset),
            ("output folder", str(self.out)),
            ("item feature group", self.item_feature_group),
            ("user-history feature group", self.user_history_group),
            ("training arguments", " ".join(self.train_args) or "(defaults)"),
        ]
        if self.is_aws:
            rows += [("role", self.role_arn or "-"), ("bucket", self.bucket or "-"),
                     ("image", self.image_uri or "- (TWOSTAGE_IMAGE_URI, needed by 03)"),
                     ("endpoint base name", self.endpoint_name)]
        else:
            rows += [("Feature Store", f"the local server, database {self.feature_store_db}"),
                     ("endpoint", {"auto": "Docker when an engine answers, else the host `serve`",
                                   "docker": "Docker", "host": "the host `serve`"}[self.serve])]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    value = env.get(name) or allowed[0]
    if value not in allowed:
        raise NotebookError(f"{name}={value!r}: choose one of {', '.join(allowed)}")
    return value


def _auto_target(role: str | None, bucket: str | None, credentials_found: Callable[[], bool]) -> tuple[str, str]:
    if not (role and bucket):
        return "local", "TWOSTAGE_ROLE_ARN and TWOSTAGE_BUCKET are not both set"
    if not credentials_found():
        return "local", "no AWS credentials found"
    return "aws", "AWS credentials, TWOSTAGE_ROLE_ARN and TWOSTAGE_BUCKET found"


def _boto3_region() -> str | None:
    import boto3

    return boto3.session.Session().region_name


def _boto3_credentials_found() -> bool:
    import boto3

    return boto3.session.Session().get_credentials() is not None
