"""Data-parallel training across processes and machines (PyTorch DistributedDataParallel).

The run is started by ``torchrun`` (by hand, or by SageMaker's ``torch_distributed`` launcher on
every instance of a training job). :meth:`Distribution.from_environment` reads torchrun's
variables once at start-up into a frozen object that is passed down; with none of them set the
run is one process, there is no process group at all and training is unchanged bit for bit.

What is distributed: the two neural training loops (MF and the sequence model). Each epoch's
batches are cut the same way on every rank (same seed, same permutation) and each rank takes its
slice of every batch; DistributedDataParallel averages the gradients, and the loss is weighted so
the average equals the single-process gradient of the whole batch. The same optimisation as one
process, up to the order of floating-point sums: the quality does not depend on the number of
processes, only the time does. Everything else (data preparation, point-in-time features,
neighbour lists, XGBoost) is deterministic and replicated on every rank; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# torchrun's variables: https://pytorch.org/docs/stable/elastic/run.html#environment-variables
_REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# A rank that dies leaves the others waiting in a collective: give up after this long rather than
# hold a paid instance forever (torchrun also stops the group when one worker fails).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


class DistributionError(ValueError):
    """torchrun's environment is incomplete or inconsistent; the message is one line."""


@dataclass(frozen=True)
class Distribution:
    """Where this process sits in the job: ``rank`` of ``world_size`` (``local_rank`` on its host)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = "none"  # "gloo" on CPU, "nccl" on CUDA; "none" for a single process

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sparse_gradients(self) -> bool:
        """Whether gradients may be sparse: NCCL cannot all-reduce sparse tensors (gloo can), so
        on GPUs the distributed tables are dense."""
        return self.backend != "nccl"

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the model, the metrics and the plots; the others only train."""
        return self.rank == 0

    @property
    def n_hosts(self) -> int:
        return self.world_size // self.local_world_size

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, cuda: bool | None = None) -> Distribution:
        """torchrun's RANK, WORLD_SIZE, LOCAL_RANK (+ MASTER_ADDR/PORT) or a single process.

        ``cuda`` (default: whether torch sees a GPU) picks the backend: NCCL on GPUs, gloo on CPUs.
        """
        env = os.environ if environ is None else environ
        present = [name for name in _REQUIRED if env.get(name)]
        if not present:
            return cls()
        missing = [name for name in _REQUIRED if name not in present]
        if missing:
            raise DistributionError(
                f"distributed run: {', '.join(missing)} not set (start it with torchrun, which sets all of "
                f"{', '.join(_REQUIRED)})"
            )
        values: dict[str, int] = {}
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            text = env.get(name, env.get("WORLD_SIZE") if name == "LOCAL_WORLD_SIZE" else None)
            try:
                values[name] = int(text or "")
            except ValueError:
                raise DistributionError(f"distributed run: {name}={text!r} is not an integer") from None
        rank, world = values["RANK"], values["WORLD_SIZE"]
        local_rank, local_world = values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"]
        if world < 1 or not 0 <= rank < world or not 0 <= local_rank < local_world or world % local_world:
            raise DistributionError(
                f"distributed run: inconsistent RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}, "
                f"LOCAL_WORLD_SIZE={local_world}"
            )
        if world == 1:
            return cls()
        use_cuda = torch.cuda.is_available() if cuda is None else cuda
        return cls(rank, world, local_rank, local_world, "nccl" if use_cuda else "gloo")

    def device(self) -> torch.device:
        """This rank's device: its own GPU under NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


SINGLE = Distribution()


@contextlib.contextmanager
def process_group(distribution: Distribution) -> Iterator[Distribution]:
    """The process group for the run (nothing for a single process); torn down on the way out."""
    if not distribution.is_distributed:
        yield distribution
        return
    if distribution.backend == "nccl":
        torch.cuda.set_device(distribution.local_rank)
    dist.init_process_group(distribution.backend, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield distribution
    finally:
        dist.destroy_process_group()


def shard(batch: torch.Tensor | Any, distribution: Distribution) -> Any:
    """This rank's slice of a batch (every ``world_size``-th row from ``rank``)."""
    if not distribution.is_distributed:
        return batch
    return batch[distribution.rank :: distribution.world_size]


def wrap(model: torch.nn.Module, distribution: Distribution, sparse: bool = False) -> torch.nn.Module:
    """``model`` in DistributedDataParallel (gradients averaged over ranks), or as it is: in one
    process, or with ``sparse`` gradients, which DDP cannot bucket (:func:`average_gradients`
    averages those after each backward)."""
    if not distribution.is_distributed or sparse:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [distribution.local_rank] if distribution.backend == "nccl" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def average_gradients(model: torch.nn.Module, distribution: Distribution) -> None:
    """Average every parameter's gradient over ranks by hand, for a model :func:`wrap` left
    unwrapped because its gradients are sparse (gloo all-reduces sparse tensors; NCCL cannot).
    Nothing to do in one process or for a DistributedDataParallel model, which averaged them."""
    from torch.nn.parallel import DistributedDataParallel

    if not distribution.is_distributed or isinstance(model, DistributedDataParallel):
        return
    for parameter in model.parameters():
        if parameter.grad is not None:
            grad = parameter.grad.coalesce() if parameter.grad.is_sparse else parameter.grad
            dist.all_reduce(grad)
            parameter.grad = grad / distribution.world_size


def total(value: float, distribution: Distribution) -> float:
    """The sum of ``value`` over ranks (every rank gets it)."""
    if not distribution.is_distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=distribution.device())
    dist.all_reduce(tensor)
    return float(tensor.item())


def agreed(value: float, distribution: Distribution) -> float:
    """Rank 0's ``value`` on every rank: decisions such as early stopping cannot diverge."""
    if not distribution.is_distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=distribution.device())
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def barrier(distribution: Distribution) -> None:
    if distribution.is_distributed:
        dist.barrier()
