"""Stage-1 matrix factorization in PyTorch, exported as two float32 matrices for retrieval.

Two objectives share one model:
- ``"rating"``: squared error on explicit ratings, ``mu + b_u + b_i + e_u . e_i`` (a good
  rating predictor, a weak retriever).
- ``"bpr"``: Bayesian Personalised Ranking on implicit feedback (every interaction is a
  positive), ``b_i + e_u . e_i``; the user bias cannot change a user's ranking, so it is 0.

The biases are folded into the exported vectors, user ``[b_u (+ mu), 1, e_u]`` and item
``[1, b_i, e_i]``, so ``user_vectors @ item_vectors.T`` is the model's score with no extra terms.
"""

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.distributed import SINGLE, Distribution, agreed, average_gradients, shard, total, wrap
from training.metrics import recall_at_k, top_k_unseen
from training.models.lazy_adam import LazyAdam

Objective = Literal["rating", "bpr"]

VALIDATION_K = 100  # early stopping watches stage-1 Recall@100, the candidate count of serving

# Dense Adam updates every table row at every step, SparseAdam only the rows in the batch but at
# a higher cost per row. Measured on 2 CPU cores with 4096-example batches: dense is 2x faster with
# ML-1M's 10k rows, sparse 35x faster with 1M items. The switch: more table rows than this many
# per batch example. It was measured with torch's SparseAdam; LazyAdam, the same update, runs the
# sparse side at about half its cost, which would move the switch lower (not re-measured).
_SPARSE_ROWS_PER_BATCH_ROW = 8


@dataclass(frozen=True)
class MFConfig:
    """Hyper-parameters of :func:`train_mf`.

    Defaults are for 100k-1M interaction datasets (ML-100k, ML-1M) on a CPU, chosen on planted
    synthetic data of those shapes (validation Recall@100, never test data):
    - ``dim`` 64: 32 and 128 were within noise of it at these sizes.
    - ``lr`` 5e-3 (Adam) with 4096-example batches: validation recall peaks after ~10-20 epochs;
      1e-2 peaks sooner but lower; bigger batches did not make an epoch much cheaper.
    - ``reg`` 1e-2: L2 weight on the factor and bias rows a batch touches, averaged per example,
      so users and items are shrunk in proportion to their data as in per-example SGD. For BPR,
      1e-2 beat 1e-5..3e-3 and 3e-2; for ratings it sits near the classic 0.02 of this
      formulation (a rating fit barely depends on it for retrieval).
    - ``epochs`` is an upper bound when a validation set drives early stopping (``patience``).
    Training is CPU-bound on many small ops: on shared cores ``torch.set_num_threads(1)`` in the
    caller can be many times faster than two threads waiting for each other.
    """

    objective: Objective = "bpr"
    dim: int = 64
    epochs: int = 40
    patience: int = 3
    batch_size: int = 4096
    lr: float = 5e-3
    reg: float = 1e-2
    init_std: float = 0.1
    seed: int = 0
    device: str = "auto"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.objective not in ("rating", "bpr"):
            raise ValueError(f"MFConfig.objective must be 'rating' or 'bpr', got {self.objective!r}")
        for name in ("dim", "epochs", "patience", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"MFConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.reg < 0 or self.init_std <= 0:
            raise ValueError(
                f"MFConfig needs lr > 0, reg >= 0, init_std > 0 (got {self.lr}, {self.reg}, {self.init_std})"
            )


@dataclass(frozen=True)
class MFResult:
    """Trained factors with biases folded in, and how training went.

    ``user_vectors`` (n_users, dim + 2) and ``item_vectors`` (n_items, dim + 2) are float32;
    ``best_epoch`` is 1-based (the epoch whose weights these are); ``history`` has one dict per
    epoch run with ``epoch``, ``loss`` (the data term: MSE or BPR log-loss), ``seconds`` and,
    with validation, ``val_recall@100``.
    """

    user_vectors: np.ndarray
    item_vectors: np.ndarray
    best_epoch: int
    history: list[dict[str, float]] = field(repr=False)
    config: MFConfig


class MatrixFactorization(torch.nn.Module):
    """Factor and bias tables; ``batch_loss`` trains them, ``score`` and ``export`` read them.

    Biases live in their own (n, 1) tables rather than in a column of the factor tables: slicing
    a column out makes every product strided, which measured ~25% slower per epoch on CPU.
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        config: MFConfig,
        global_mean: float,
        generator: torch.Generator,
        sparse: bool,
    ) -> None:
        super().__init__()
        device = generator.device
        self.sparse = sparse
        self.global_mean = global_mean
        self.user_factors = torch.nn.Parameter(
            torch.randn(n_users, config.dim, generator=generator, device=device) * config.init_std
        )
        self.item_factors = torch.nn.Parameter(
            torch.randn(n_items, config.dim, generator=generator, device=device) * config.init_std
        )
        self.item_bias = torch.nn.Parameter(torch.zeros(n_items, 1, device=device))
        # BPR compares items for one user, so a user bias would cancel out: only "rating" has one.
        self.user_bias = (
            torch.nn.Parameter(torch.zeros(n_users, 1, device=device)) if config.objective == "rating" else None
        )

    def _rows(self, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # An embedding lookup has a much faster backward than indexing, and can be sparse.
        return F.embedding(idx, table, sparse=self.sparse)

    def score(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """Model score of aligned (user, item) index pairs; ``export`` reproduces it as a dot product."""
        score = (self._rows(self.user_factors, user_idx) * self._rows(self.item_factors, item_idx)).sum(dim=1)
        score = score + self._rows(self.item_bias, item_idx)[:, 0]
        if self.user_bias is not None:
            score = score + self._rows(self.user_bias, user_idx)[:, 0] + self.global_mean
        return score

    def forward(
        self, user_idx: torch.Tensor, item_idx: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training step's loss terms (:meth:`batch_loss`): DistributedDataParallel only
        synchronises gradients of what runs through ``forward``."""
        return self.batch_loss(user_idx, item_idx, target)

    def batch_loss(
        self, user_idx: torch.Tensor, item_idx: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(data loss, L2 penalty per example) of a batch; the formulas are ``score``'s, unrolled.

        ``target`` holds the ratings for ``"rating"`` and one sampled negative item per
        example for ``"bpr"``. Each table row is looked up once and reused for the penalty.
        """
        user = self._rows(self.user_factors, user_idx)
        if self.user_bias is None:
            both = torch.cat([item_idx, target])  # one lookup (and one backward scatter) for both items
            item, bias = self._rows(self.item_factors, both), self._rows(self.item_bias, both)[:, 0]
            n = len(user_idx)
            margin = (user * (item[:n] - item[n:])).sum(dim=1) + bias[:n] - bias[n:]
            data_loss = -F.logsigmoid(margin).mean()
            penalty = (user * user).sum() + (item * item).sum() + (bias * bias).sum()
        else:
            item = self._rows(self.item_factors, item_idx)
            item_bias = self._rows(self.item_bias, item_idx)[:, 0]
            user_bias = self._rows(self.user_bias, user_idx)[:, 0]
            predicted = (user * item).sum(dim=1) + item_bias + user_bias + self.global_mean
            data_loss = (predicted - target).square().mean()
            penalty = (user * user).sum() + (item * item).sum() + (item_bias * item_bias).sum()
            penalty = penalty + (user_bias * user_bias).sum()
        return data_loss, penalty / len(user_idx)

    @torch.no_grad()
    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """(user_vectors, item_vectors) float32 with the biases folded in; see the module docstring."""
        user_factors, item_factors = self.user_factors.detach(), self.item_factors.detach()
        user_ones, item_ones = torch.ones_like(user_factors[:, :1]), torch.ones_like(item_factors[:, :1])
        if self.user_bias is None:
            user_bias = torch.zeros_like(user_ones)
        else:
            user_bias = self.user_bias.detach() + self.global_mean
        user_vectors = torch.cat([user_bias, user_ones, user_factors], dim=1)
        item_vectors = torch.cat([item_ones, self.item_bias.detach(), item_factors], dim=1)
        return user_vectors.cpu().numpy(), item_vectors.cpu().numpy()


def train_mf(
    n_users: int,
    n_items: int,
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    rating: np.ndarray,
    config: MFConfig,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    fixed_epochs: int | None = None,
    distribution: Distribution = SINGLE,
) -> MFResult:
    """Fit MF on interactions ``(user_idx[n], item_idx[n], rating[n])`` and export the factors.

    ``rating`` is the target of the ``"rating"`` objective and ignored by ``"bpr"``.
    ``validation`` is ``(user_idx, item_idx)`` with one held-out item per user: after every
    epoch Recall@100 is computed by full ranking with the training interactions masked; training
    stops after ``config.patience`` epochs without improvement and the best epoch's vectors are
    returned. ``fixed_epochs`` is the refit mode: exactly that many epochs, no validation (use
    the ``best_epoch`` chosen on validation). With neither, ``config.epochs`` epochs are run.

    In a distributed run (``distribution``, process group initialised) every rank passes the same
    data and takes its slice of each batch; gradients are averaged by DistributedDataParallel, and
    early stopping follows rank 0's validation, so every rank returns the same vectors.
    """
    user_idx, item_idx = _check_pairs("training", user_idx, item_idx, n_users, n_items)
    if len(user_idx) == 0:
        raise ValueError("train_mf needs at least one training interaction")
    rating = np.asarray(rating, dtype=np.float32)
    if config.objective == "rating" and (rating.shape != user_idx.shape or not np.isfinite(rating).all()):
        raise ValueError(f"rating must be {len(user_idx)} finite values, one per interaction")
    if fixed_epochs is not None and (validation is not None or fixed_epochs < 1):
        raise ValueError("fixed_epochs (>= 1) is the refit mode: pass it without validation")
    if validation is not None:
        val_user_idx, val_item_idx = _check_pairs("validation", *validation, n_users, n_items)
        seen_indptr, seen_indices = _seen_csr(user_idx, item_idx, n_users, n_items)
    n_epochs = fixed_epochs or config.epochs

    auto_device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto_device if config.device == "auto" else config.device)
    if distribution.is_distributed:
        device = distribution.device()
    generator = torch.Generator(device=device).manual_seed(config.seed)
    sparse = n_users + n_items > _SPARSE_ROWS_PER_BATCH_ROW * config.batch_size and distribution.sparse_gradients
    global_mean = float(rating.mean()) if config.objective == "rating" else 0.0
    model = MatrixFactorization(n_users, n_items, config, global_mean, generator, sparse)
    optimizer = (
        LazyAdam(model.parameters(), lr=config.lr)
        if sparse
        else torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    )
    trained = wrap(model, distribution, sparse)
    users = torch.from_numpy(user_idx).to(device)
    items = torch.from_numpy(item_idx).to(device)
    ratings = torch.from_numpy(rating).to(device) if config.objective == "rating" else None

    history: list[dict[str, float]] = []
    best_epoch, best_recall = 0, -1.0
    best_vectors = model.export()
    progress = tqdm(
        range(1, n_epochs + 1),
        desc=f"MF {config.objective}",
        unit="epoch",
        disable=not config.show_progress or not distribution.is_main,
    )
    for epoch in progress:
        started = time.perf_counter()
        loss = _train_epoch(trained, optimizer, users, items, ratings, n_items, config, generator, distribution)
        record = {"epoch": float(epoch), "loss": loss}
        vectors = model.export()
        if validation is None:
            best_epoch, best_vectors = epoch, vectors
        else:
            recall = 0.0
            if distribution.is_main:  # the others take rank 0's score: one decision, computed once
                ranked = top_k_unseen(*vectors, val_user_idx, seen_indptr, seen_indices, VALIDATION_K)
                recall = recall_at_k(ranked, val_item_idx, VALIDATION_K)
            recall = agreed(recall, distribution)
            record[f"val_recall@{VALIDATION_K}"] = recall
            if recall > best_recall:
                best_epoch, best_recall, best_vectors = epoch, recall, vectors
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        progress.set_postfix({k: round(v, 4) for k, v in record.items() if k not in ("epoch", "seconds")})
        if validation is not None and epoch - best_epoch >= config.patience:
            break
    progress.close()
    return MFResult(best_vectors[0], best_vectors[1], best_epoch, history, config)


def _train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    users: torch.Tensor,
    items: torch.Tensor,
    ratings: torch.Tensor | None,
    n_items: int,
    config: MFConfig,
    generator: torch.Generator,
    distribution: Distribution = SINGLE,
) -> float:
    """One pass over the shuffled interactions; returns the mean data loss.

    ``model`` is the :class:`MatrixFactorization` or, distributed, its DistributedDataParallel
    wrapper: every rank draws the same permutation and negatives and trains on its slice of each
    batch, its loss weighted by its share of the batch so the averaged gradient is the batch's.
    """
    n = len(users)
    order = torch.randperm(n, generator=generator, device=users.device)
    if ratings is None:
        # Uniform negatives, fresh each epoch. A sampled "negative" the user actually interacted
        # with has probability ~ (items per user / n_items), a few percent on ML-1M; it only adds a
        # little noise to the gradient, so rejecting it is not worth a seen-set lookup per sample.
        targets = torch.randint(n_items, (n,), generator=generator, device=users.device)
    else:
        targets = ratings
    world = distribution.world_size
    total_loss = torch.zeros((), device=users.device)
    for start in range(0, n, config.batch_size):
        batch = order[start : start + config.batch_size]
        if len(batch) < world:  # a last batch too small for every rank to get a row: skipped by all
            continue
        rows = shard(batch, distribution)
        data_loss, penalty = model(users[rows], items[rows], targets[rows])
        optimizer.zero_grad(set_to_none=True)
        loss = data_loss + config.reg * penalty
        if distribution.is_distributed:
            loss = loss * (len(rows) * world / len(batch))  # DDP divides the sum of ranks by world
        loss.backward()
        average_gradients(model, distribution)
        optimizer.step()
        total_loss += data_loss.detach() * len(rows)
    return total(float(total_loss), distribution) / n


def _check_pairs(
    what: str, user_idx: np.ndarray, item_idx: np.ndarray, n_users: int, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validated int64 copies of aligned (user, item) index arrays."""
    user_idx, item_idx = np.asarray(user_idx), np.asarray(item_idx)
    for name, idx, bound in (("user_idx", user_idx, n_users), ("item_idx", item_idx, n_items)):
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"{what} {name} must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        if len(idx) and (idx.min() < 0 or idx.max() >= bound):
            raise ValueError(f"{what} {name} out of range [0, {bound}): min {idx.min()}, max {idx.max()}")
    if user_idx.shape != item_idx.shape:
        raise ValueError(f"{what} user_idx and item_idx differ in length: {len(user_idx)} vs {len(item_idx)}")
    return user_idx.astype(np.int64), item_idx.astype(np.int64)


def _seen_csr(user_idx: np.ndarray, item_idx: np.ndarray, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Each user's distinct training items as CSR (indptr int64, indices int32), rows sorted."""
    pairs = np.unique(user_idx * n_items + item_idx)  # one int64 key per pair: sorted by (user, item), deduplicated
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(pairs // n_items, minlength=n_users), out=indptr[1:])
    return indptr, (pairs % n_items).astype(np.int32)
