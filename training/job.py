"""Inside a SageMaker training job: where the inputs and outputs are, checks, and the entry script.

SageMaker's PyTorch container (``sagemaker-pytorch-training-toolkit``) runs the entry script on
every instance; with ``distribution={"torch_distributed": {"enabled": True}}`` it runs it under
``torchrun --nnodes <instances> --nproc_per_node <GPUs, or 1 on a CPU instance> --node_rank <i>``,
so each process finds RANK/WORLD_SIZE in its environment (``training/distributed.py``). The
hyper-parameters arrive as ``--name value`` pairs: :func:`entry` turns them back into the
``python -m training run`` command line.

Everything here reads the environment once, into a frozen :class:`JobEnvironment`; the checks
raise :class:`training.datasets.DataError` with one line naming the channel or setting.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from training.datasets import DataError
from training.distributed import Distribution

# The channels the job reads (DESIGN: CSV or Amazon Reviews 2023); each holds exactly one file.
CHANNELS: Final = ("interactions", "items", "reviews", "meta")
# Every instance prepares the whole data set (training/distributed.py): a channel sharded across
# instances would give each rank different data.
REPLICATED: Final = "FullyReplicated"
# ``run`` flags that take no value: a hyper-parameter "true" turns them on, "false" leaves them off.
FLAGS: Final = ("no-sequence-model", "no-baselines", "no-ablations", "full-report", "no-progress", "release-memory")
_DEFAULT_CONFIG_DIR: Final = "/opt/ml/input/config"
_DEFAULT_OUTPUT_DIR: Final = "/opt/ml/output"


@dataclass(frozen=True)
class JobEnvironment:
    """A training job's paths and cluster, as SageMaker's toolkit describes them."""

    model_dir: Path  # SM_MODEL_DIR: tarred and uploaded at the end of the job
    output_data_dir: Path  # SM_OUTPUT_DATA_DIR: metrics and plots
    failure_file: Path  # one line read by DescribeTrainingJob's FailureReason
    channels: Mapping[str, Path] = field(default_factory=dict)  # SM_CHANNEL_<NAME>
    hosts: tuple[str, ...] = ()
    current_host: str = ""
    distribution_types: Mapping[str, str] = field(default_factory=dict)  # channel -> S3DistributionType

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> JobEnvironment | None:
        """The job's environment, or None outside a training job (no SM_MODEL_DIR)."""
        env = os.environ if environ is None else environ
        model = env.get("SM_MODEL_DIR")
        if not model:
            return None
        prefix = "SM_CHANNEL_"
        channels = {k[len(prefix) :].lower(): Path(v) for k, v in env.items() if k.startswith(prefix)}
        config_dir = Path(env.get("SM_INPUT_CONFIG_DIR", _DEFAULT_CONFIG_DIR))
        resources = _json(env.get("SM_RESOURCE_CONFIG"), config_dir / "resourceconfig.json")
        hosts = _json(env.get("SM_HOSTS"), None) or resources.get("hosts") or []
        current = env.get("SM_CURRENT_HOST") or resources.get("current_host", "")
        inputs = _json(env.get("SM_INPUT_DATA_CONFIG"), config_dir / "inputdataconfig.json")
        kinds = {name: str(spec.get("S3DistributionType", REPLICATED)) for name, spec in inputs.items()}
        output = Path(env.get("SM_OUTPUT_DIR", _DEFAULT_OUTPUT_DIR))
        return cls(
            model_dir=Path(model),
            output_data_dir=Path(env.get("SM_OUTPUT_DATA_DIR", str(output / "data"))),
            failure_file=output / "failure",
            channels=channels,
            hosts=tuple(sorted(hosts)),
            current_host=current,
            distribution_types=kinds,
        )

    def check(self, distribution: Distribution) -> None:
        """Stop with one line when the job cannot train as laid out (before any data is read)."""
        for name, path in sorted(self.channels.items()):
            if name in CHANNELS:
                channel_file(name, path)
        n_hosts = max(1, len(self.hosts))
        if n_hosts > 1:
            for name, kind in sorted(self.distribution_types.items()):
                if name in CHANNELS and kind != REPLICATED:
                    raise DataError(
                        f"channel {name!r} is {kind} over {n_hosts} instances: every instance prepares the whole "
                        f"data set, so the channel must be {REPLICATED}"
                    )
            if not distribution.is_distributed:
                raise DataError(
                    f"instance count {n_hosts} but this process was not started by torchrun: set "
                    "distribution={'torch_distributed': {'enabled': True}} (python -m training launch does)"
                )
        if distribution.is_distributed and distribution.n_hosts != n_hosts:
            raise DataError(
                f"torchrun runs {distribution.world_size} processes, {distribution.local_world_size} per node, "
                f"on {distribution.n_hosts} nodes, but the job has instance count {n_hosts}"
            )

    def publish(self, model_dir: Path, outputs: Sequence[Path]) -> None:
        """Copy the finished model into SM_MODEL_DIR (files at its root: SageMaker tars it) and the
        outputs into SM_OUTPUT_DATA_DIR. All or nothing: on any error the model files copied so far
        are removed, so a failed job never leaves a partial model to upload."""
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.output_data_dir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        try:
            for path in sorted(model_dir.iterdir()):
                partial = self.model_dir / f".{path.name}.partial"
                written.append(partial)
                shutil.copy2(path, partial)
                target = self.model_dir / path.name
                written.append(target)
                partial.replace(target)  # a file appears whole or not at all
            for path in outputs:
                shutil.copy2(path, self.output_data_dir / path.name)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise

    def fail(self, message: str) -> None:
        """Record the one-line reason where SageMaker shows it (DescribeTrainingJob FailureReason)."""
        try:
            self.failure_file.parent.mkdir(parents=True, exist_ok=True)
            self.failure_file.write_text(message + "\n", encoding="utf-8")
        except OSError:  # the reason is on stderr too; a read-only output dir must not mask it
            pass


def channel_file(name: str, path: Path) -> Path:
    """The one file of a channel (SageMaker mounts a channel as a folder)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"channel {name!r}: {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"channel {name!r} is empty: {path} holds no file")
    if len(files) > 1:
        raise DataError(
            f"channel {name!r} holds {len(files)} files ({files[0].name}, {files[1].name}, ...): "
            "the job reads exactly one file per channel"
        )
    return files[0]


def entry(argv: Sequence[str]) -> int:
    """SageMaker's entry script: ``--name value`` hyper-parameter pairs to ``python -m training run``."""
    from training.__main__ import main

    try:
        arguments = run_arguments(argv)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        job = JobEnvironment.from_environment()
        if job is not None:
            job.fail(str(exc))
        return 2
    return main(["run", *arguments])


def run_arguments(pairs: Sequence[str]) -> list[str]:
    """The toolkit's ``--name value`` pairs as ``run`` arguments: flags "true"/"false" become present
    or absent, a comma-separated ``column`` becomes repeated ``--column`` options."""
    if len(pairs) % 2:
        raise DataError(f"hyper-parameters must come as --name value pairs, got {' '.join(pairs)!r}")
    out: list[str] = []
    for key, value in zip(pairs[::2], pairs[1::2]):
        name = key.lstrip("-")
        if name in FLAGS:
            if value.lower() not in ("true", "false"):
                raise DataError(f"hyper-parameter {name}: expected true or false, got {value!r}")
            out += [f"--{name}"] if value.lower() == "true" else []
        elif name == "column":
            for mapping in filter(None, value.split(",")):
                out += ["--column", mapping]
        else:
            out += [f"--{name}", value]
    return out


def _json(text: str | None, path: Path | None) -> Any:
    """A JSON object from an environment variable, else from a file, else empty."""
    if text:
        value = json.loads(text)
    elif path is not None and path.is_file():
        value = json.loads(path.read_text(encoding="utf-8"))
    else:
        return {}
    return value
