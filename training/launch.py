"""Launch training as a SageMaker training job on one or several instances.

    python -m training launch --role-arn arn:aws:iam::ACCOUNT:role/SageMakerRole --region eu-west-1 \\
        --instance-type ml.c6i.4xlarge --instance-count 2 \\
        --interactions s3://bucket/data/interactions.csv [--items s3://bucket/data/items.csv] \\
        --output-path s3://bucket/twostage/jobs [--wait] -- --epochs 40 --no-ablations

The job runs SageMaker's PyTorch training container (the SDK's ``sagemaker.pytorch.PyTorch``
estimator, SDK v2) with ``distribution={"torch_distributed": {"enabled": True}}``: on every
instance the container runs ``torchrun --nnodes <instances> --nproc_per_node <GPUs, or 1 on a CPU
instance>`` on a small entry script, which runs ``python -m training run`` with the arguments
after ``--`` (checked here against ``run``'s own parser before anything is sent). Each channel is
one S3 object, copied whole to every instance (FullyReplicated); the job reads it as in
``run``'s training-job mode. ``sagemaker`` is imported only here, from the ``launch`` extra:
neither ``run`` nor the serving image needs it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from training.datasets import DataError
from training.run_options import CHANNELS, FLAGS, REPLICATED, add_run_arguments

# The SageMaker PyTorch training container: the newest the SDK's image table (and its
# torch_distributed support list) knows. The model code uses nothing newer than torch 2.x.
FRAMEWORK_VERSION: Final = "2.8.0"
PY_VERSION: Final = "py312"
ENTRY_SCRIPT: Final = "train_job.py"
# The torch_distributed launcher's processes per host come from this hyper-parameter (the
# training toolkit's MPI_PROCESSES_PER_HOST); unset it runs one per GPU, or one on a CPU instance.
PROCESSES_PER_HOST: Final = "sagemaker_mpi_num_of_processes_per_host"
ROOT: Final = Path(__file__).resolve().parent.parent
# run options the job sets itself: the data comes from channels and the model goes to SM_MODEL_DIR.
_JOB_OWNED: Final = ("interactions", "items", "reviews", "meta", "out")
# The SDK's settings for this command: its telemetry (an HTTP request to AWS after each call)
# off, and no SDK-defaults files read from the machine: every setting of the job is on the command line.
SDK_CONFIG: Final = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}
_ENTRY_TEXT: Final = '''"""SageMaker's entry point: torchrun runs this on every instance (see training/launch.py)."""
import sys

from training.__main__ import job_entry

sys.exit(job_entry(sys.argv[1:]))
'''


@dataclass(frozen=True)
class LaunchSpec:
    """One training job: where it runs, what it reads, what ``run`` options it passes."""

    role_arn: str
    region: str
    instance_type: str
    instance_count: int
    output_path: str  # s3://bucket/prefix: model.tar.gz, output.tar.gz (metrics) and the code
    channels: Mapping[str, str] = field(default_factory=dict)  # channel name -> s3://bucket/key
    hyperparameters: Mapping[str, str] = field(default_factory=dict)
    job_name: str | None = None
    processes_per_host: int | None = None
    max_run_hours: float = 24.0
    volume_size_gb: int = 50


def hyperparameters_from_run_arguments(arguments: Sequence[str]) -> dict[str, str]:
    """``run`` options as job hyper-parameters (only those that differ from ``run``'s defaults).

    Raises DataError with one line for an option ``run`` does not know or the job owns.
    """
    parser = _QuietParser(prog="python -m training launch ... --", add_help=False)
    add_run_arguments(parser)
    parsed = vars(parser.parse_args(list(arguments)))
    defaults = vars(parser.parse_args([]))
    out: dict[str, str] = {}
    for name, value in parsed.items():
        if value == defaults[name]:
            continue
        option = name.replace("_", "-")
        if name in _JOB_OWNED:
            raise DataError(f"--{option} after --: the job reads its data from the channels (--interactions, "
                            "--items, --reviews, --meta before --) and writes the model to SM_MODEL_DIR")
        if name == "dataset" and value in ("csv", "amazon"):
            raise DataError(f"--dataset {value} after --: give the files as channels before -- instead")
        if option in FLAGS:
            out[option] = "true"
        elif name == "column":
            out[option] = ",".join(value)
        else:
            out[option] = str(value)
    return out


def check(spec: LaunchSpec, s3: Any) -> None:
    """Stop with one line before anything is created: settings, then each channel's S3 object.

    ``s3`` is a boto3 S3 client (ListObjectsV2 only).
    """
    if spec.instance_count < 1:
        raise DataError(f"--instance-count {spec.instance_count}: at least 1")
    if spec.processes_per_host is not None and spec.processes_per_host < 1:
        raise DataError(f"--processes-per-host {spec.processes_per_host}: at least 1")
    family = spec.instance_type.split(".")[1] if spec.instance_type.count(".") >= 2 else ""
    if not spec.instance_type.startswith("ml.") or not family:
        raise DataError(f"--instance-type {spec.instance_type!r}: a SageMaker training type such as ml.c6i.4xlarge")
    if family.startswith(("trn", "inf")):
        raise DataError(f"--instance-type {spec.instance_type}: Trainium/Inferentia need Neuron-compiled models; "
                        "use a CPU (ml.c*, ml.m*) or GPU (ml.g*, ml.p*) type")
    if not spec.output_path.startswith("s3://"):
        raise DataError(f"--output-path {spec.output_path!r}: an s3:// prefix")
    names = set(spec.channels)
    if not names & {"interactions", "reviews"} and "dataset" not in spec.hyperparameters:
        raise DataError("no data: give --interactions (CSV) or --reviews (Amazon) as s3:// objects, "
                        "or a built-in --dataset after --")
    if {"interactions", "items"} & names and {"reviews", "meta"} & names:
        raise DataError("channels: either CSV (--interactions, --items) or Amazon (--reviews, --meta), not both")
    if "items" in names and "interactions" not in names or "meta" in names and "reviews" not in names:
        raise DataError("channels: --items needs --interactions and --meta needs --reviews")
    for name, uri in sorted(spec.channels.items()):
        _check_channel(name, uri, s3)


def _check_channel(name: str, uri: str, s3: Any) -> None:
    """A channel is one S3 object: the job reads exactly one file per channel."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key:
        raise DataError(f"channel {name!r}: {uri!r} is not an s3://bucket/key URI")
    # A channel is an S3 prefix: SageMaker copies every object under it, so two matches mean two files.
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=2)
    keys = [o["Key"] for o in listed.get("Contents", []) if not o["Key"].endswith("/") and o.get("Size", 1) > 0]
    if not keys:
        raise DataError(f"channel {name!r} is empty: no object under {uri}")
    if len(keys) > 1:
        raise DataError(f"channel {name!r}: {uri} matches several objects ({keys[0]}, {keys[1]}, ...): "
                        "the job reads exactly one file per channel; point at one object")


def stage_source(directory: Path) -> Path:
    """The job's code folder: the training and serving packages, the entry script and the
    container's requirements (the PyTorch image brings torch; requirements/job.txt the rest)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "training", directory / "training", ignore=ignore)
    shutil.copytree(ROOT / "code" / "twostage_rec", directory / "twostage_rec", ignore=ignore)
    shutil.copy2(ROOT / "requirements" / "job.txt", directory / "requirements.txt")
    (directory / ENTRY_SCRIPT).write_text(_ENTRY_TEXT, encoding="utf-8")
    return directory


def build_estimator(spec: LaunchSpec, session: Any, source_dir: Path) -> Any:
    """The SDK's PyTorch estimator for ``spec`` (nothing is sent yet)."""
    from sagemaker import image_uris
    from sagemaker.pytorch import PyTorch

    # SDK v2 refuses torch_distributed on CPU instance types unless the image is given
    # (fw_utils.validate_torch_distributed_distribution): the image for this instance type,
    # from the SDK's own table, keeps CPU instances possible (the models here are small).
    image_uri = image_uris.retrieve(
        "pytorch", spec.region, version=FRAMEWORK_VERSION, py_version=PY_VERSION,
        instance_type=spec.instance_type, image_scope="training", sagemaker_session=session,
    )
    hyperparameters = dict(spec.hyperparameters)
    hyperparameters.setdefault("no-progress", "true")  # one log line an epoch in CloudWatch, not bars
    if spec.processes_per_host is not None:
        hyperparameters[PROCESSES_PER_HOST] = str(spec.processes_per_host)
    return PyTorch(
        entry_point=ENTRY_SCRIPT,
        source_dir=str(source_dir),
        role=spec.role_arn,
        image_uri=image_uri,
        framework_version=FRAMEWORK_VERSION,
        py_version=PY_VERSION,
        instance_type=spec.instance_type,
        instance_count=spec.instance_count,
        distribution={"torch_distributed": {"enabled": True}},
        hyperparameters=hyperparameters,
        output_path=spec.output_path.rstrip("/"),
        code_location=spec.output_path.rstrip("/"),
        max_run=int(spec.max_run_hours * 3600),
        volume_size=spec.volume_size_gb,
        sagemaker_session=session,
        disable_profiler=True,
        debugger_hook_config=False,
    )


def launch(spec: LaunchSpec, session: Any, wait: bool = False) -> str:
    """Check, build and start the job (CreateTrainingJob); returns its name."""
    from sagemaker.inputs import TrainingInput

    check(spec, session.s3_client)
    with tempfile.TemporaryDirectory(prefix="twostage-launch-") as scratch:
        estimator = build_estimator(spec, session, stage_source(Path(scratch)))
        inputs = {name: TrainingInput(uri, distribution=REPLICATED) for name, uri in spec.channels.items()}
        estimator.fit(inputs or None, wait=wait, logs="All" if wait else "None", job_name=spec.job_name)
    return str(estimator.latest_training_job.name)


def make_session(region: str) -> Any:
    """A SageMaker session on boto3 in ``region`` (credentials from the usual chain)."""
    import boto3
    import sagemaker

    return sagemaker.Session(boto_session=boto3.session.Session(region_name=region), sagemaker_config=SDK_CONFIG)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training launch ...``; returns the exit status (2 and one line for bad input)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["launch"]:
        arguments = arguments[1:]
    own, run_arguments = _split(arguments)
    parser = argparse.ArgumentParser(prog="python -m training launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role-arn", required=True, help="the job's execution role")
    parser.add_argument("--region", required=True)
    parser.add_argument("--instance-type", required=True, help="e.g. ml.c6i.4xlarge (CPU) or ml.g5.xlarge (GPU)")
    parser.add_argument("--instance-count", type=int, default=1)
    parser.add_argument("--processes-per-host", type=int, default=None,
                        help="torchrun processes per instance (default: one per GPU, or 1 on a CPU instance)")
    for name in CHANNELS:
        parser.add_argument(f"--{name}", metavar="S3_URI", help=f"the {name} channel: one s3:// object")
    parser.add_argument("--output-path", required=True, metavar="S3_PREFIX")
    parser.add_argument("--job-name", default=None)
    parser.add_argument("--max-run-hours", type=float, default=24.0)
    parser.add_argument("--volume-size-gb", type=int, default=50)
    parser.add_argument("--wait", action="store_true", help="wait for the job and stream its logs")
    args = parser.parse_args(own)
    try:
        spec = LaunchSpec(
            role_arn=args.role_arn,
            region=args.region,
            instance_type=args.instance_type,
            instance_count=args.instance_count,
            output_path=args.output_path,
            channels={n: getattr(args, n) for n in CHANNELS if getattr(args, n)},
            hyperparameters=hyperparameters_from_run_arguments(run_arguments),
            job_name=args.job_name,
            processes_per_host=args.processes_per_host,
            max_run_hours=args.max_run_hours,
            volume_size_gb=args.volume_size_gb,
        )
        name = launch(spec, make_session(args.region), wait=args.wait)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: {exc.name or exc}: install the launch extra (pip install -e '.[launch]')", file=sys.stderr)
        return 2
    print(f"training job {name} started ({spec.instance_count} x {spec.instance_type})")
    return 0


def _split(arguments: list[str]) -> tuple[list[str], list[str]]:
    if "--" in arguments:
        at = arguments.index("--")
        return arguments[:at], arguments[at + 1 :]
    return arguments, []


class _QuietParser(argparse.ArgumentParser):
    """argparse that raises DataError (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise DataError(f"run options after --: {message}")
