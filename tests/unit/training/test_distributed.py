"""Training beyond one process: torchrun's environment, the SageMaker job checks, and real
two-process runs (gloo on CPU) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.datasets import DataError
from training.distributed import Distribution, DistributionError
from training.job import JobEnvironment, channel_file
from training.run_options import run_arguments

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("ddp_worker.py")
TORCHRUN_ENV = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "algo-1", "MASTER_PORT": "7777"}


def _environment(**extra: str) -> dict[str, str]:
    """This interpreter's environment for a child: the worktree's code first, one torch thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "code"), str(ROOT)])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _torchrun(*args: str, env: dict[str, str], nproc: int = 2) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)


# --- torchrun's environment ----------------------------------------------------------------------


def test_no_torchrun_variables_is_one_process_without_a_group() -> None:
    single = Distribution.from_environment({})
    assert not single.is_distributed and single.is_main and single.backend == "none"


def test_torchrun_variables_give_rank_world_and_backend() -> None:
    cpu = Distribution.from_environment(TORCHRUN_ENV, cuda=False)
    assert (cpu.rank, cpu.world_size, cpu.local_rank, cpu.n_hosts, cpu.backend) == (1, 4, 1, 2, "gloo")
    assert cpu.is_distributed and not cpu.is_main
    assert Distribution.from_environment(TORCHRUN_ENV, cuda=True).backend == "nccl"


@pytest.mark.parametrize(
    ("change", "named"),
    [({"MASTER_PORT": ""}, "MASTER_PORT not set"), ({"RANK": "x"}, "RANK='x'"), ({"RANK": "4"}, "inconsistent")],
)
def test_bad_torchrun_environment_is_one_line_naming_the_variable(change: dict[str, str], named: str) -> None:
    with pytest.raises(DistributionError, match=named) as caught:
        Distribution.from_environment({**TORCHRUN_ENV, **change}, cuda=False)
    assert "\n" not in str(caught.value)


# --- the SageMaker job's layout ------------------------------------------------------------------


def _job(tmp_path: Path, hosts: list[str], kinds: dict[str, str] | None = None) -> JobEnvironment:
    channel = tmp_path / "interactions"
    channel.mkdir(exist_ok=True)
    env = {"SM_MODEL_DIR": str(tmp_path / "model"), "SM_OUTPUT_DIR": str(tmp_path / "output"),
           "SM_CHANNEL_INTERACTIONS": str(channel), "SM_HOSTS": json.dumps(hosts), "SM_CURRENT_HOST": hosts[0],
           "SM_INPUT_DATA_CONFIG": json.dumps({k: {"S3DistributionType": v} for k, v in (kinds or {}).items()})}
    job = JobEnvironment.from_environment(env)
    assert job is not None
    return job


def test_outside_a_training_job_there_is_no_job() -> None:
    assert JobEnvironment.from_environment({"SM_CHANNEL_X": "/x"}) is None


def test_an_empty_channel_stops_naming_the_channel(tmp_path: Path) -> None:
    job = _job(tmp_path, ["algo-1"])
    with pytest.raises(DataError, match="channel 'interactions' is empty"):
        job.check(Distribution())
    for name in ("a.csv", "b.csv"):
        (tmp_path / "interactions" / name).write_text("user_id,item_id,rating,timestamp\n")
    with pytest.raises(DataError, match="channel 'interactions' holds 2 files"):
        channel_file("interactions", tmp_path / "interactions")


def test_instance_count_must_match_the_data_layout_and_the_launcher(tmp_path: Path) -> None:
    two = ["algo-2", "algo-1"]
    (tmp_path / "interactions" / "inter.csv").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "interactions" / "inter.csv").write_text("user_id,item_id,rating,timestamp\n")
    sharded = _job(tmp_path, two, {"interactions": "ShardedByS3Key"})
    ranks = Distribution.from_environment({**TORCHRUN_ENV, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
                                           "LOCAL_RANK": "0"}, cuda=False)
    with pytest.raises(DataError, match="channel 'interactions' is ShardedByS3Key over 2 instances"):
        sharded.check(ranks)
    replicated = _job(tmp_path, two, {"interactions": "FullyReplicated"})
    assert replicated.hosts == ("algo-1", "algo-2")
    replicated.check(ranks)  # 2 nodes x 1 process = the 2 instances
    with pytest.raises(DataError, match="instance count 2 but this process was not started by torchrun"):
        replicated.check(Distribution())
    with pytest.raises(DataError, match="on 2 nodes, but the job has instance count 1"):
        _job(tmp_path, ["algo-1"]).check(ranks)


def test_publish_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    job = _job(tmp_path, ["algo-1"])
    built = tmp_path / "built"
    built.mkdir()
    for name in ("manifest.json", "ranker.ubj", "user_factors.npy"):
        (built / name).write_text(name)
    copy = shutil.copy2
    calls = []

    def failing_copy(source: Path, target: Path) -> None:
        calls.append(source)
        if len(calls) == 3:
            raise OSError("No space left on device")
        copy(source, target)

    monkeypatch.setattr(shutil, "copy2", failing_copy)
    with pytest.raises(OSError, match="No space"):
        job.publish(built, [])
    assert list(job.model_dir.iterdir()) == []  # the two files already in place were taken back
    monkeypatch.setattr(shutil, "copy2", copy)
    metrics = tmp_path / "metrics.json"
    metrics.write_text("{}")
    job.publish(built, [metrics])
    assert sorted(p.name for p in job.model_dir.iterdir()) == ["manifest.json", "ranker.ubj", "user_factors.npy"]
    assert (job.output_data_dir / "metrics.json").read_text() == "{}"


def test_hyperparameters_become_run_arguments() -> None:
    pairs = ["--column", "user_id=customer,item_id=sku", "--epochs", "30", "--no-ablations", "true",
             "--no-baselines", "false"]
    assert run_arguments(pairs) == ["--column", "user_id=customer", "--column", "item_id=sku", "--epochs", "30",
                                    "--no-ablations"]
    with pytest.raises(DataError, match="no-ablations: expected true or false"):
        run_arguments(["--no-ablations", "yes"])


def test_a_job_with_an_empty_channel_fails_with_one_line_and_a_failure_file(tmp_path: Path) -> None:
    env = _environment(SM_MODEL_DIR=str(tmp_path / "model"), SM_OUTPUT_DIR=str(tmp_path / "output"),
                       SM_CHANNEL_INTERACTIONS=str(tmp_path / "interactions"))
    (tmp_path / "interactions").mkdir()
    done = subprocess.run([sys.executable, "-m", "training", "run", "--no-progress"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: channel 'interactions' is empty")
    assert "Traceback" not in done.stderr
    assert (tmp_path / "output" / "failure").read_text().startswith("channel 'interactions' is empty")
    assert not (tmp_path / "model").exists() or not any((tmp_path / "model").iterdir())


# --- two real processes (torchrun, gloo) ---------------------------------------------------------


def test_two_processes_train_what_one_process_trains(tmp_path: Path) -> None:
    """Same batches split over two ranks with averaged gradients: the same optimisation as one
    process, so MF's vectors agree to float rounding and the sequence model's quality is the same."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    single = subprocess.run([sys.executable, str(WORKER), str(one)], env=_environment(), cwd=ROOT,
                            capture_output=True, text=True, timeout=600, check=False)
    assert single.returncode == 0, single.stderr[-3000:]
    double = _torchrun(str(WORKER), str(two), env=_environment())
    assert double.returncode == 0, double.stderr[-3000:]
    alone, rank0, rank1 = (np.load(path, allow_pickle=False) for path in (one / "rank0.npz", two / "rank0.npz", two / "rank1.npz"))
    for key in alone.files:  # every rank ends with the same models
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)
    for key in ("mf_fixed_users", "mf_fixed_items", "mf_sparse_items", "mf_early_items"):
        np.testing.assert_allclose(rank0[key], alone[key], atol=1e-4, err_msg=key)
    assert int(rank0["mf_best_epoch"]) == int(alone["mf_best_epoch"])
    assert float(rank0["mf_hr10"]) == pytest.approx(float(alone["mf_hr10"]), abs=0.02)
    assert float(alone["mf_hr10"]) > 0.2  # it learnt something (popularity is far below)
    assert float(rank0["seq_hr5"]) == pytest.approx(float(alone["seq_hr5"]), abs=0.1)
    assert float(alone["seq_hr5"]) > 0.5  # the cycle is learnt (chance: 5 / 30)
    assert float(rank0["seq_sparse_hr5"]) == pytest.approx(float(alone["seq_sparse_hr5"]), abs=0.1)
    assert float(alone["seq_sparse_hr5"]) > 0.5


def test_two_processes_run_the_pipeline_and_only_rank_0_writes(tmp_path: Path) -> None:
    """``torchrun -m training run`` in SageMaker job mode on one instance with two processes."""
    from twostage_rec.artifact import load_artifact

    from training.datasets import generate_synthetic

    channel = tmp_path / "input" / "interactions"
    channel.mkdir(parents=True)
    generate_synthetic(n_users=120, n_items=150, seed=3).interactions.to_csv(channel / "inter.csv", index=False)
    model_dir, output = tmp_path / "model", tmp_path / "output"
    env = _environment(SM_MODEL_DIR=str(model_dir), SM_OUTPUT_DIR=str(output), SM_CHANNEL_INTERACTIONS=str(channel),
                       SM_HOSTS='["algo-1"]', SM_CURRENT_HOST="algo-1")
    done = _torchrun("-m", "training", "run", "--epochs", "2", "--dim", "8", "--sequence-epochs", "2",
                     "--no-baselines", "--no-ablations", "--no-progress", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained by 2 processes on 1 node(s)" in done.stdout
    assert done.stdout.count("model: ") == 1  # rank 1 printed no report
    artifact = load_artifact(model_dir, verify_checksums=True)
    assert artifact.manifest.n_users == 120
    assert json.loads((output / "data" / "metrics.json").read_text())["dataset"] == "csv"
    assert not (output / "failure").exists()


def test_the_staged_entry_script_runs_from_the_code_folder_alone(tmp_path: Path) -> None:
    """What SageMaker's container runs: ``python train_job.py --name value ...`` in the staged
    code folder, with no PYTHONPATH: the packages import from there and the pairs reach ``run``."""
    from training.launch import ENTRY_SCRIPT, stage_source

    code = stage_source(tmp_path / "code")
    (tmp_path / "interactions").mkdir()
    env = _environment(SM_MODEL_DIR=str(tmp_path / "model"), SM_OUTPUT_DIR=str(tmp_path / "output"),
                       SM_CHANNEL_INTERACTIONS=str(tmp_path / "interactions"))
    del env["PYTHONPATH"]
    done = subprocess.run([sys.executable, ENTRY_SCRIPT, "--epochs", "3", "--no-ablations", "true"], env=env,
                          cwd=code, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: channel 'interactions' is empty")
    bad = subprocess.run([sys.executable, ENTRY_SCRIPT, "--no-ablations", "maybe"], env=env, cwd=code,
                         capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2 and "no-ablations: expected true or false" in bad.stderr
