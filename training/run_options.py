"""The options of ``python -m training run``: one definition for the command line, the SageMaker
training job (whose hyper-parameters become these options) and ``launch`` (which checks what it
passes to the job against them). It imports none of those three modules.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from training.datasets import DATASET_NAMES, DataError

# The channels the job reads (DESIGN: CSV or Amazon Reviews 2023); each holds exactly one file.
CHANNELS: Final = ("interactions", "items", "reviews", "meta")
# Every instance prepares the whole data set (training/distributed.py): a channel sharded across
# instances would give each rank different data.
REPLICATED: Final = "FullyReplicated"
# ``run`` flags that take no value: a hyper-parameter "true" turns them on, "false" leaves them off.
FLAGS: Final = ("no-sequence-model", "no-baselines", "no-ablations", "no-replay", "full-report",
                  "no-progress", "release-memory")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``run``; ``launch`` checks its pass-through arguments against the same."""
    parser.add_argument("--dataset", choices=DATASET_NAMES, help="data source (default: ml-100k, or from SM_CHANNEL_*)")
    parser.add_argument("--interactions", type=Path, help="csv: interactions file")
    parser.add_argument("--items", type=Path, help="csv: items file (optional)")
    parser.add_argument("--reviews", type=Path, help="amazon: reviews JSONL(.gz)")
    parser.add_argument("--meta", type=Path, help="amazon: meta JSONL(.gz) (optional)")
    parser.add_argument("--column", action="append", default=[], metavar="OURS=THEIRS",
                        help="csv: rename a column, e.g. --column user_id=customer")
    parser.add_argument("--n-users", type=int, default=None,
                        help="synthetic: users (default 2,000; with --n-interactions, a fifth of them)")
    parser.add_argument("--n-items", type=int, default=None,
                        help="synthetic: items (default 5,000; with --n-interactions, a fiftieth of them)")
    parser.add_argument("--n-interactions", type=int, default=None, metavar="N",
                        help="synthetic: the Amazon-like long-tail shape with N interactions "
                             "(many users with a few each, a long tail of items)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="output folder (default: $SM_MODEL_DIR in a training job, else out/)")
    parser.add_argument("--objective", choices=["bpr", "rating"], default="bpr",
                        help="MF objective: bpr (ranking, default) or rating (squared error)")
    parser.add_argument("--ranker-objective", choices=["auto", "rank:ndcg", "reg:logistic", "reg:squarederror"],
                        default="auto", help="auto: rank:ndcg or reg:logistic, whichever validates better")
    parser.add_argument("--dim", type=int, default=64, help="MF embedding dimension")
    parser.add_argument("--epochs", type=int, default=40, help="MF epoch upper bound (early stopping picks)")
    parser.add_argument("--history-length", type=int, default=50,
                        help="each user's last N items kept in order (the sequence model's input length)")
    parser.add_argument("--sequence-epochs", type=int, default=24,
                        help="sequence model epoch upper bound (early stopping picks)")
    parser.add_argument("--no-sequence-model", action="store_true", help="stage 1 without the sequence model")
    parser.add_argument("--no-baselines", action="store_true", help="skip EASE and Surprise SVD")
    parser.add_argument("--no-ablations", action="store_true", help="skip the ablation runs of the report")
    parser.add_argument("--full-report", action="store_true",
                        help="EASE in full and the ablations whatever they cost (by default they are cut or "
                             "skipped, and say so, above a budget that keeps a 1M-interaction run under 4 GB)")
    parser.add_argument("--no-replay", action="store_true",
                        help="skip the deployment-like replay (a second training up to the time before which 90%% of "
                             "the interactions fall, then every later interaction served as a request)")
    parser.add_argument("--evaluation-users", type=int, default=None, metavar="N",
                        help="validation and test on at most N users, a seeded sample above it (default 10,000)")
    parser.add_argument("--feature-group", help="Feature Store item feature group name")
    parser.add_argument("--user-history-group", help="Feature Store user-history group name (recorded in the manifest)")
    # Measured on the 2-core build machine: idle, the sequence model's ML-1M epoch took ~34 s on
    # one thread and ~29 s on two; with other processes on the cores, two threads ran an epoch up
    # to 15x slower than one (the threads wait on each other). So one per core by default, and
    # --threads 1 on a shared machine. MF always trains on one thread (pipeline._fit_mf).
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default 0: one per core; 1 on a shared machine)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--release-memory", action="store_true",
                        help="give freed memory back to the system as glibc does by default; without it the run "
                             "keeps freed memory for reuse: faster, the same peak, but resident at the peak until it ends")


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
