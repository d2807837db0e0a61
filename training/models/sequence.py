"""The sequence model: a SASRec-style causal self-attention encoder over a user's recent items.

Kang & McAuley (2018), in the shape that trains well on a CPU: item and position embeddings,
``n_blocks`` pre-norm transformer blocks (one attention head by default, ReLU feed-forward), a final
layer norm; the output at each position scores every item by a dot product with the (tied) item
embeddings, and the loss is the full softmax cross-entropy of the next item at every position
(Petrov & Macdonald 2023: far better than SASRec's original one-negative BCE), computed in chunks
that never hold the whole logit matrix (:func:`full_softmax_loss`). Catalogs above
``full_softmax_max_items`` use a sampled softmax over shared uniform negatives instead, and there
the item table's gradient is sparse and its update lazy (SparseAdam's update, :mod:`lazy_adam`:
only the rows a step touches), so a step costs its batch, not the catalog.

One epoch shows each user's last ``recent_targets`` interactions once as targets: the sequence is
cut, from its end, into windows of ``max_length + 1`` items. Early stopping watches validation
NDCG@10 (full ranking, seen items masked), scored by the torch model (the exported graph gives the
same vectors, as a test checks). Seeded; CUDA is used when present. Serving never imports this
module: :func:`to_onnx` exports the encoder for ONNX Runtime
(:class:`twostage_rec.sequence_encoder.SequenceEncoder`).
"""

from __future__ import annotations

import copy
import io
import itertools
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.distributed import SINGLE, Distribution, agreed, average_gradients, shard, total, wrap
from training.interactions import Histories
from training.models.lazy_adam import LazyAdam
from twostage_rec.sequence_encoder import GRAPH_ITEMS, GRAPH_OUTPUT, GRAPH_VALID, EncoderSpec

logger = logging.getLogger(__name__)


# Small data needs small batches: ML-100k has ~2,000 training windows, and 16 steps an epoch at
# 128 a batch learnt far slower per second than 64 steps at 32 (validation NDCG@10 0.11 after 7
# epochs vs 13). Large data keeps 128, where each step is the most efficient.
MIN_STEPS = 64
FEED_FORWARDS = ("relu", "swiglu")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class SequenceConfig:
    """Hyper-parameters; defaults measured on ML-1M validation on 2 CPU cores (docs/training.md)."""

    dim: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    # The blocks' feed-forward layer: "relu" (SASRec's) or "swiglu" (gated), of dim x ff_multiplier
    # hidden units; gated_residual scales each block's additions by a learnt sigmoid gate (LiGR).
    # On ML-1M validation (the model alone, trained on the train split) SwiGLU x4 led ReLU x1 by
    # 0.003-0.006 NDCG@10 at equal epochs and peaked at 0.1644 against 0.1611 (docs/evaluation.md).
    feed_forward: str = "swiglu"
    ff_multiplier: int = 4
    gated_residual: bool = False
    max_length: int = 50
    dropout: float = 0.2
    lr: float = 3e-3
    # "constant", or "cosine": the learning rate falls from lr to 0 over the epochs (step by step),
    # so the last epochs take small steps; early stopping may end the run before the end.
    lr_schedule: str = "constant"
    batch_size: int = 0  # 0: about MIN_STEPS steps an epoch, between 32 and 128 sequences a batch
    # An upper bound; early stopping on validation picks the epoch. On ML-1M validation NDCG@10
    # still rises to ~23 epochs (SwiGLU x4: 0.157 at 15, 0.164 at 23) at ~25-30 s an epoch here.
    epochs: int = 24
    patience: int = 4
    # Each user's most recent interactions that serve as training targets (SASRec's ML-1M setting
    # reads the last 200): older ones of heavy users cost epoch time and help little.
    recent_targets: int = 200
    # Above this many items the full softmax's cost per target (one logit per item) makes an
    # epoch grow as interactions x items; the sampled one costs sampled_negatives per target.
    # At 8x the negatives (16,384) the full one is 8x dearer: measured on the long-tail synthetic
    # data at 300k interactions (6,000 items), an epoch was already ~60% softmax. MovieLens
    # (1,682 and 3,706 items) keeps the full softmax.
    full_softmax_max_items: int = 16_384
    sampled_negatives: int = 2048
    seed: int = 0
    device: str = "auto"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 0:
            raise ValueError(f"SequenceConfig.batch_size must be >= 0 (0 = automatic), got {self.batch_size}")
        for name in ("dim", "n_blocks", "n_heads", "ff_multiplier", "max_length", "epochs", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"SequenceConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"SequenceConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.feed_forward not in FEED_FORWARDS:
            raise ValueError(f"SequenceConfig.feed_forward must be one of {FEED_FORWARDS}, got {self.feed_forward!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"SequenceConfig.dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if not 0 <= self.dropout < 1 or self.lr <= 0:
            raise ValueError(f"SequenceConfig needs dropout in [0, 1) and lr > 0, got {self.dropout}, {self.lr}")


@dataclass(frozen=True)
class SequenceResult:
    """The trained model, exported; ``history`` has one dict per epoch run."""

    graph: bytes  # the encoder as an ONNX model (to_onnx)
    spec: EncoderSpec
    item_vectors: np.ndarray  # float32 (n_items, dim)
    best_epoch: int
    history: list[dict[str, float]] = field(repr=False)
    config: SequenceConfig
    model: SASRec = field(repr=False)  # the torch module, for tests that compare with the export


class Dropout(torch.nn.Module):
    """``torch.nn.Dropout`` with its mask drawn by ``torch.rand_like``: the same distribution.

    On the CPU, ``F.dropout`` draws its mask with ``bernoulli_``, which ran on one thread and took
    5.9 ms for a 128 x 50 x 64 batch on 2 cores; ``rand_like`` and a comparison took 2.9 ms. At
    seven dropouts a step, ``bernoulli_`` was 15% of an ML-1M-shaped training step in a torch
    profile (184 -> 151 ms a step); in the pipeline an ML-1M epoch went from 28-31 s to 17-24 s.
    On one thread both ways take ~4 ms. Same distribution, other draws: a seed gives another model.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = (torch.rand_like(x) >= self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * keep


class _FeedForward(torch.nn.Module):
    """The position-wise feed-forward layer: ``dim -> hidden -> dim``, ReLU (SASRec's) or SwiGLU
    (Shazeer 2020: ``silu(y W_gate) * (y W_up)``, the gated layer of eSASRec's LiGR blocks)."""

    def __init__(self, dim: int, hidden: int, kind: str, dropout: Dropout) -> None:
        super().__init__()
        self.swiglu = kind == "swiglu"
        # SwiGLU's gate and up projections are one matrix: one product instead of two.
        self.ff1 = torch.nn.Linear(dim, 2 * hidden if self.swiglu else hidden)
        self.ff2 = torch.nn.Linear(hidden, dim)
        self.dropout = dropout

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.ff1(y).chunk(2, dim=-1)
            return self.ff2(self.dropout(F.silu(gate) * up))
        return self.ff2(self.dropout(F.relu(self.ff1(y))))


class _Block(torch.nn.Module):
    """Pre-norm attention and feed-forward, each added to the residual stream; with
    ``gated_residual`` (LiGR, Borisyuk et al. 2025) each addition is scaled element-wise by
    ``sigmoid(x W + b)`` of the stream it is added to."""

    def __init__(self, config: SequenceConfig) -> None:
        super().__init__()
        dim = config.dim
        self.n_heads = config.n_heads
        self.attention_norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.feed_forward_norm = torch.nn.LayerNorm(dim)
        self.dropout = Dropout(config.dropout)
        self.feed_forward = _FeedForward(dim, dim * config.ff_multiplier, config.feed_forward, self.dropout)
        self.gates = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(2 if config.gated_residual else 0))

    def _add(self, x: torch.Tensor, update: torch.Tensor, which: int) -> torch.Tensor:
        """``x + update``, gated by ``x`` when the block has gates (``which``: 0 attention, 1 feed-forward)."""
        if self.gates:
            return x + torch.sigmoid(self.gates[which](x)) * update
        return x + update

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        y = self.attention_norm(x)
        q, k, v = self.qkv(y).view(batch, length, 3, self.n_heads, dim // self.n_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = self._add(x, self.dropout(self.out(attended.transpose(1, 2).reshape(batch, length, dim))), 0)
        x = self._add(x, self.dropout(self.feed_forward(self.feed_forward_norm(x))), 1)
        return x * valid

    def last_slot(self, x: torch.Tensor, allowed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(batch, 1, dim): :meth:`forward` at the last slot only (eval mode: no dropout).

        Keys and values still come from every slot, but the query, the attention row, the output
        projection and the feed-forward run for one slot instead of ``length``: in the last block
        that is all the user vector needs.
        """
        batch, length, dim = x.shape
        heads = self.n_heads
        y = self.attention_norm(x)
        weight, bias = self.qkv.weight, self.qkv.bias  # rows: the query's, the key's, the value's
        q = F.linear(y[:, -1:], weight[:dim], bias[:dim]).view(batch, 1, heads, dim // heads).transpose(1, 2)
        k, v = F.linear(y, weight[dim:], bias[dim:]).view(batch, length, 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, :, -1:])
        x = self._add(x[:, -1:], self.out(attended.transpose(1, 2).reshape(batch, 1, dim)), 0)
        x = self._add(x, self.feed_forward(self.feed_forward_norm(x)), 1)
        return x * valid[:, -1:]


class SASRec(torch.nn.Module):
    """Item ids are shifted by one inside the model: 0 is the padding slot."""

    def __init__(self, n_items: int, config: SequenceConfig, sparse: bool = False) -> None:
        super().__init__()
        dim = config.dim
        self.max_length = config.max_length
        # sparse: the lookup's gradient holds the looked-up rows only (for lazy Adam).
        self.sparse = sparse
        self.item_embedding = torch.nn.Embedding(n_items + 1, dim, padding_idx=0, sparse=sparse)
        self.position_embedding = torch.nn.Embedding(config.max_length, dim)
        # Small embeddings: N(0, 1) ones make the first logits huge and the softmax saturate.
        torch.nn.init.normal_(self.item_embedding.weight, std=dim**-0.5)
        torch.nn.init.normal_(self.position_embedding.weight, std=dim**-0.5)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        self.blocks = torch.nn.ModuleList(_Block(config) for _ in range(config.n_blocks))
        self.final_norm = torch.nn.LayerNorm(dim)
        self.dropout = Dropout(config.dropout)

    def hidden(self, seq: torch.Tensor) -> torch.Tensor:
        """(batch, length, dim) outputs of left-padded ``seq`` (item idx + 1; 0 = padding)."""
        return self.encode(self.item_embedding(seq), seq > 0)

    def encode(self, embedded: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(batch, length, dim) outputs of embedded items (batch, length, dim) and the bool mask
        of the slots that hold one."""
        x, allowed, valid = self._inputs(embedded, valid)
        for block in self.blocks:
            x = block(x, allowed, valid)
        return self.final_norm(x)

    def encode_last(self, embedded: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(batch, dim): :meth:`encode` at the last slot, the user vector, in eval mode: what
        serving runs (:func:`to_onnx`). The last block computes that slot only."""
        x, allowed, valid = self._inputs(embedded, valid)
        for block in self.blocks[:-1]:
            x = block(x, allowed, valid)
        return self.final_norm(self.blocks[-1].last_slot(x, allowed, valid))[:, -1]

    def _inputs(self, embedded: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first block's input, the attention mask (batch, 1, length, length) and the
        (batch, length, 1) validity of each slot."""
        length = embedded.shape[1]
        positions = self.position_embedding.weight[self.max_length - length :]
        x = self.dropout(embedded + positions) * valid.unsqueeze(-1)
        # Comparisons, not tril/eye: they export to ONNX ops every runtime implements.
        slots = torch.arange(length, device=embedded.device)
        allowed = ((slots[:, None] >= slots[None, :])[None] & valid[:, None, :]) | (
            slots[:, None] == slots[None, :]
        )[None]
        return x, allowed[:, None], valid.unsqueeze(-1)  # one mask for every head

    def forward(self, *seqs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`hidden` of each of ``seqs`` (one training batch split into groups of similar
        width): one call a step, because DistributedDataParallel only synchronises what runs
        through ``forward``, once per backward."""
        return tuple(self.hidden(seq) for seq in seqs)

    def user_vectors(self, seq: torch.Tensor) -> torch.Tensor:
        """(batch, dim): the last slot's output of left-padded ``seq``, the user vectors; in eval
        mode by :meth:`encode_last` (validation scores every user each epoch: at 200 slots the
        full forward of every slot was most of its cost)."""
        if self.training:
            return self.hidden(seq)[:, -1]
        return self.encode_last(self.item_embedding(seq), seq > 0)

    @property
    def item_vectors(self) -> torch.Tensor:
        return self.item_embedding.weight[1:]


def left_padded(sequences: list[np.ndarray], length: int) -> np.ndarray:
    """int64 (len(sequences), length): the last ``length`` items of each, +1, left-padded with 0."""
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for row, items in enumerate(sequences):
        tail = items[-length:]
        if len(tail):
            out[row, length - len(tail) :] = tail + 1
    return out


Validator = Callable[[SASRec], float]  # validation NDCG@10 of the model in eval mode


def train_sequence_model(
    histories: Histories,
    n_items: int,
    config: SequenceConfig,
    validate: Validator | None = None,
    fixed_epochs: int | None = None,
    warm_start: SequenceResult | None = None,
    label: str = "sequence model",
    distribution: Distribution = SINGLE,
) -> SequenceResult:
    """Train on every user's sequence in ``histories``; keep the epoch with the best ``validate``.

    ``validate`` returns validation NDCG@10 for the model (called after each epoch, in eval mode);
    training stops after ``patience`` epochs without improvement. ``fixed_epochs`` runs exactly
    that many epochs without validation (a refit). ``warm_start`` continues from a trained model's
    weights (at half the learning rate) instead of a fresh initialisation; epochs count anew.

    Distributed (``distribution``, process group initialised): every rank passes the same
    histories, takes its slice of each batch of windows and DistributedDataParallel averages the
    gradients; ``validate`` runs on rank 0 and its score is broadcast, so every rank keeps the
    same epoch.
    """
    if fixed_epochs is not None and (validate is not None or fixed_epochs < 1):
        raise ValueError("fixed_epochs (>= 1) is the refit mode: pass it without validate")
    if int(histories.lengths.max(initial=0)) < 2:
        raise ValueError("the sequence model needs at least one user with two or more interactions")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    )
    if distribution.is_distributed:
        device = distribution.device()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    full_softmax = n_items <= config.full_softmax_max_items
    # The full softmax gives every item row a gradient at every step: dense is the right layout.
    # The sampled one touches the step's inputs, targets and negatives: a few thousand rows. A
    # dense update there reads and writes the whole table (and Adam's two moments) every step, so
    # an epoch cost steps x catalog: 1,661 s for the first epoch at 10M interactions (200k items),
    # most of it in the update. Distributed on GPUs (NCCL) the table stays dense, where the
    # memory bandwidth makes it cheap.
    sparse = not full_softmax and distribution.sparse_gradients
    model = SASRec(n_items, config, sparse).to(device)
    lr = config.lr
    if warm_start is not None:
        model.load_state_dict(warm_start.model.state_dict())
        lr = config.lr / 2  # continuing: smaller steps keep what it learnt
    optimizers = _optimizers(model, lr)
    trained = wrap(model, distribution, sparse)
    windows = _windows(histories, config.max_length, config.recent_targets)
    if not config.batch_size:
        config = replace(config, batch_size=int(np.clip(len(windows) // MIN_STEPS, 32, 128)))
    n_epochs = fixed_epochs or config.epochs
    schedules = _schedules(optimizers, config.lr_schedule, n_epochs * -(-len(windows) // config.batch_size))

    history: list[dict[str, float]] = []
    best_epoch, best_score, best_state = 0, -math.inf, None
    show = config.show_progress and distribution.is_main
    progress = tqdm(range(1, n_epochs + 1), desc=label, unit="epoch", disable=not show)
    for epoch in progress:
        started = time.perf_counter()
        model.train()
        loss = _epoch(
            trained, model, optimizers, schedules, windows, rng, config, n_items, full_softmax, device, distribution
        )
        record = {"epoch": float(epoch), "loss": loss}
        model.eval()
        if validate is None:
            best_epoch, best_state = epoch, None
        else:
            with torch.no_grad():
                # Rank 0 validates and the others take its score: one decision, computed once.
                score = agreed(validate(model) if distribution.is_main else 0.0, distribution)
                record["val_ndcg@10"] = score
            if score > best_score:
                best_epoch, best_score = epoch, score
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        progress.set_postfix({k: round(v, 4) for k, v in record.items() if k not in ("epoch", "seconds")})
        if not config.show_progress and distribution.is_main:  # no bar (logs, CI): one line an epoch
            logger.info(
                "%s epoch %d: %s (%.0f s)",
                label,
                epoch,
                ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "seconds")),
                record["seconds"],
            )
        if validate is not None and epoch - best_epoch >= config.patience:
            break
    progress.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    graph, spec, item_vectors = export(model, config)
    return SequenceResult(graph, spec, item_vectors, best_epoch, history, config, model.cpu())


def _optimizers(model: SASRec, lr: float) -> list[torch.optim.Optimizer]:
    """Adam on every parameter; with a sparse item table, lazy Adam (SparseAdam's update: the
    moments of the rows a step touches) on that table and Adam on the rest."""
    # fused: one pass over each parameter a step instead of ~10. With a dense item table that is
    # most of the parameters: on 60,000 items the unfused step took 50 ms, the fused one 7 ms
    # (one thread), and at 3M interactions the unfused steps were most of an epoch.
    if not model.sparse:
        return [torch.optim.Adam(model.parameters(), lr=lr, fused=True)]
    table = model.item_embedding.weight
    rest = [p for p in model.parameters() if p is not table]
    return [LazyAdam([table], lr=lr), torch.optim.Adam(rest, lr=lr, fused=True)]


def _schedules(
    optimizers: list[torch.optim.Optimizer], kind: str, steps: int
) -> list[torch.optim.lr_scheduler.LRScheduler]:
    """Per-step learning-rate schedules of ``kind`` over ``steps`` steps (none for "constant")."""
    if kind == "constant":
        return []
    return [
        torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
        for o in optimizers
    ]


def export(model: SASRec, config: SequenceConfig) -> tuple[bytes, EncoderSpec, np.ndarray]:
    """(ONNX graph, its shape, item vectors) for :class:`twostage_rec.sequence_encoder.SequenceEncoder`."""
    spec = EncoderSpec(config.dim, config.n_blocks, config.n_heads, config.max_length)
    item_vectors = np.ascontiguousarray(model.item_vectors.detach().cpu().numpy(), dtype=np.float32)
    return to_onnx(model), spec, item_vectors


class _UserVectorGraph(torch.nn.Module):
    """What serving runs: embedded items and their mask in, the last slot's output out."""

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.model.encode_last(items, valid)


def to_onnx(model: SASRec) -> bytes:
    """The encoder (after the item lookup) as an ONNX model, batch and length dynamic."""
    graph = _UserVectorGraph(copy.deepcopy(model).cpu()).eval()  # eval: dropout off in the export
    dim = model.item_embedding.embedding_dim
    example = (torch.zeros(2, model.max_length, dim), torch.ones(2, model.max_length, dtype=torch.bool))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) warns that it is deprecated; the dynamo one needs
        # onnxscript, one more dependency, for a graph this small.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            example,
            buffer,
            input_names=[GRAPH_ITEMS, GRAPH_VALID],
            output_names=[GRAPH_OUTPUT],
            dynamic_axes={
                GRAPH_ITEMS: {0: "batch", 1: "length"},
                GRAPH_VALID: {0: "batch", 1: "length"},
                GRAPH_OUTPUT: {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    return buffer.getvalue()


@dataclass(frozen=True)
class _Windows:
    """The training windows as slices of one item array: window ``w`` is
    ``items[start[w] : start[w] + length[w]]`` (2 to ``max_length + 1`` items, oldest first)."""

    items: np.ndarray  # int64
    start: np.ndarray  # int64
    length: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.start)

    def padded(self, rows: np.ndarray) -> np.ndarray:
        """int64 (len(rows), longest of them): the windows' items + 1, left-padded with 0."""
        length = self.length[rows]
        width = int(length.max(initial=0))
        out = np.zeros((len(rows), width), dtype=np.int64)
        row = np.repeat(np.arange(len(rows)), length)
        within = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
        out[row, width - np.repeat(length, length) + within] = (
            self.items[np.repeat(self.start[rows], length) + within] + 1
        )
        return out


def _windows(histories: Histories, max_length: int, recent_targets: int) -> _Windows:
    """Each sequence cut from its end into windows of up to ``max_length + 1`` items (>= 2),
    until ``recent_targets`` targets are covered; users in order, each user's newest window first."""
    n = histories.lengths
    first = np.maximum(1, n - recent_targets)  # targets are items[first:]
    n_windows = -(-np.maximum(n - first, 0) // max_length)  # ceil; 0 for users with < 2 items
    user = np.repeat(np.arange(histories.n_users), n_windows)
    step = np.arange(len(user)) - np.repeat(np.cumsum(n_windows) - n_windows, n_windows)
    end = n[user] - step * max_length
    begin = np.maximum.reduce([np.zeros_like(end), end - max_length - 1, first[user] - 1])
    return _Windows(histories.items, histories.indptr[user] + begin, end - begin)


# A group of windows costs about this many padded positions' work before its first position (the
# kernels' fixed cost of a forward and backward pass); a batch is split only where the split saves
# more positions than that.
_GROUP_COST = 512
_MAX_GROUPS = 4


def _width_groups(length: np.ndarray) -> list[np.ndarray]:
    """Positions in ``length`` (a batch's window lengths) split into at most ``_MAX_GROUPS`` groups
    of similar length, so each group is padded to its own longest window, not the batch's.

    Greedy: the split (of the group where it saves most) that removes the most padded positions,
    while it saves more than ``_GROUP_COST``. On review-shaped data (most windows 2-6 items, a few
    51) one group of 128 costs 128 x 50 positions; split, most of them cost ~5.
    """
    order = np.argsort(length, kind="stable")
    ordered = length[order]
    bounds = [0, len(order)]
    while len(bounds) <= _MAX_GROUPS:
        best_saving, best_at = _GROUP_COST, -1
        for a, b in itertools.pairwise(bounds):
            if b - a < 2:
                continue
            cut = np.arange(1, b - a)  # the first `cut` windows of the group form a narrower one
            saving = cut * (ordered[b - 1] - ordered[a + cut - 1])
            k = int(np.argmax(saving))
            if saving[k] > best_saving:
                best_saving, best_at = int(saving[k]), a + int(cut[k])
        if best_at < 0:
            break
        bounds = sorted([*bounds, best_at])
    return [order[a:b] for a, b in itertools.pairwise(bounds)]


def _epoch(
    trained: torch.nn.Module,
    model: SASRec,
    optimizers: list[torch.optim.Optimizer],
    schedules: list[torch.optim.lr_scheduler.LRScheduler],
    windows: _Windows,
    rng: np.random.Generator,
    config: SequenceConfig,
    n_items: int,
    full_softmax: bool,
    device: torch.device,
    distribution: Distribution = SINGLE,
) -> float:
    """One pass over the windows; ``trained`` is ``model`` or its DistributedDataParallel wrapper.

    Distributed, every rank draws the same permutation and trains on its slice of each batch; the
    loss is summed over the slice's targets and divided by the whole batch's target count (known
    on every rank: all ranks hold all windows), so the averaged gradient is the batch's.
    """
    total_loss, count = 0.0, 0
    world = distribution.world_size
    order = rng.permutation(len(windows))
    for start in range(0, len(order), config.batch_size):
        chosen = order[start : start + config.batch_size]
        if len(chosen) < world:  # a last batch too small for every rank to get a window: skipped by all
            continue
        # Each group of a batch's windows is as wide as its longest window (_width_groups): the
        # model reads left-padded input at any length up to max_length, so short histories (most
        # users in review data) cost a few positions instead of the batch's longest. Padding
        # changes no output, so the step's loss and gradient are the whole batch's.
        rows = shard(chosen, distribution)
        padded = [torch.from_numpy(windows.padded(rows[g])).to(device) for g in _width_groups(windows.length[rows])]
        inputs = [p[:, :-1] for p in padded]
        outputs = trained(*inputs)
        hidden_parts, target_parts = [], []
        for p, group_inputs, output in zip(padded, inputs, outputs):
            targets = p[:, 1:] * (group_inputs > 0)  # a window's first item is an input only
            mask = targets > 0
            hidden_parts.append(output[mask])
            target_parts.append(targets[mask] - 1)
        hidden, target = torch.cat(hidden_parts), torch.cat(target_parts)
        if full_softmax:
            loss = full_softmax_loss(hidden, target, model.item_vectors)
        else:  # on the whole table (row 0 the padding), so that its gradient can be sparse
            negatives = torch.randint(1, n_items + 1, (config.sampled_negatives,), device=device)
            loss = sampled_softmax_loss(hidden, target + 1, model.item_embedding.weight, negatives, model.sparse)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        if distribution.is_distributed:
            batch_targets = int((windows.length[chosen] - 1).sum())  # every window has length - 1 targets
            # the sum of the ranks' gradients, divided by world (by DDP or average_gradients)
            (loss * (len(target) * world / batch_targets)).backward()
            average_gradients(trained, distribution)
        else:
            loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        for schedule in schedules:
            schedule.step()
        total_loss += float(loss.detach()) * len(target)
        count += len(target)
    return total(total_loss, distribution) / max(total(float(count), distribution), 1)


# Rows of logits per chunk: 128 x 3,706 items is 1.9 MB, which stays in a core's cache while the
# chunk goes through max, exp, sum and both gradient products (measured on ML-1M's shapes, one
# thread: 128 rows 173 ms, 512 rows 211 ms for 6,400 targets; unchunked autograd 447-495 ms).
_SOFTMAX_CHUNK = 128


class _Softmax(torch.autograd.Function):
    """Mean cross-entropy of each row's target item against every item, with both gradients
    computed in the forward pass, chunk by chunk.

    Autograd over ``F.cross_entropy(hidden @ items.T, target)`` gives the same loss and gradients
    (a test checks) but materialises the (targets x items) logits, their log-softmax and both
    their gradients as full matrices: on ML-1M (3,706 items) that was ~80% of a training step.
    Here each chunk's logits become its softmax in place and are used at once for
    ``dL/dhidden = (P - Y) @ items`` and ``dL/ditems += (P - Y).T @ hidden``; nothing of the
    logits' size outlives a chunk.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, items: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n = len(hidden)
        grad_hidden = torch.empty_like(hidden)
        grad_items = torch.zeros_like(items)
        loss = hidden.new_zeros(())
        for start in range(0, n, _SOFTMAX_CHUNK):
            rows = hidden[start : start + _SOFTMAX_CHUNK]
            chosen = target[start : start + _SOFTMAX_CHUNK]
            positive = (rows * items[chosen]).sum(dim=1, keepdim=True)
            probabilities = rows @ items.T
            peak = probabilities.amax(dim=1, keepdim=True)
            probabilities.sub_(peak).exp_()
            normaliser = probabilities.sum(dim=1, keepdim=True)
            probabilities.div_(normaliser)
            loss += (normaliser.log_() + peak - positive).sum()  # log-sum-exp minus the target's logit
            probabilities[torch.arange(len(chosen), device=hidden.device), chosen] -= 1
            torch.mm(probabilities, items, out=grad_hidden[start : start + _SOFTMAX_CHUNK])
            grad_items.addmm_(probabilities.T, rows)
        divisor = max(n, 1)  # no targets: zero loss and gradients, not 0 / 0
        ctx.save_for_backward(grad_hidden.div_(divisor), grad_items.div_(divisor))
        return loss / divisor

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        grad_hidden, grad_items = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_items * grad_loss, None


class _SampledSoftmax(torch.autograd.Function):
    """Mean cross-entropy of each row's target (logit ``hidden . positives``, row by row) against
    itself and the shared ``candidates`` (the negatives' vectors), chunked as :class:`_Softmax`.
    A negative equal to the row's target (an accidental hit, by the ids ``target`` and
    ``negatives``) is left out of that row. The gradients go to the gathered rows, so the table's
    own gradient is whatever the gathers make it (sparse or dense)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: torch.Tensor,
        positives: torch.Tensor,
        candidates: torch.Tensor,
        target: torch.Tensor,
        negatives: torch.Tensor,
    ) -> torch.Tensor:
        n = len(hidden)
        grad_hidden = torch.empty_like(hidden)
        grad_positives = torch.empty_like(positives)
        grad_candidates = torch.zeros_like(candidates)
        loss = hidden.new_zeros(())
        # The rows with an accidental hit: ~negatives / items of them (1% at 200k items). Masking
        # only those, instead of comparing every row with every negative, took the loss of 500
        # targets x 2,048 negatives from 18.1 to 14.5 ms (one thread; the comparison and the fill
        # of every row were 20% of it).
        hit = torch.isin(target, negatives)
        for start in range(0, n, _SOFTMAX_CHUNK):
            chunk = slice(start, start + _SOFTMAX_CHUNK)
            rows, own, chosen = hidden[chunk], positives[chunk], target[chunk]
            positive = (rows * own).sum(dim=1, keepdim=True)
            probabilities = rows @ candidates.T
            hit_rows = hit[chunk].nonzero()[:, 0]
            if len(hit_rows):
                probabilities[hit_rows] = probabilities[hit_rows].masked_fill_(
                    negatives[None, :] == chosen[hit_rows, None], -math.inf
                )
            peak = torch.maximum(probabilities.amax(dim=1, keepdim=True), positive)
            positive_exp = (positive - peak).exp_()
            probabilities.sub_(peak).exp_()
            normaliser = probabilities.sum(dim=1, keepdim=True) + positive_exp
            probabilities.div_(normaliser)
            positive_grad = positive_exp.div_(normaliser).sub_(1)  # the target's softmax share minus one
            loss += (normaliser.log_() + peak - positive).sum()
            torch.mm(probabilities, candidates, out=grad_hidden[chunk]).addcmul_(positive_grad, own)
            torch.mul(positive_grad, rows, out=grad_positives[chunk])
            grad_candidates.addmm_(probabilities.T, rows)
        divisor = max(n, 1)
        ctx.save_for_backward(grad_hidden.div_(divisor), grad_positives.div_(divisor), grad_candidates.div_(divisor))
        return loss / divisor

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:  # type: ignore[override]
        grad_hidden, grad_positives, grad_candidates = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_positives * grad_loss, grad_candidates * grad_loss, None, None


def full_softmax_loss(hidden: torch.Tensor, target: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(hidden @ items.T, target)`` at a fraction of its time and memory."""
    return _Softmax.apply(hidden, items, target)


def sampled_softmax_loss(
    hidden: torch.Tensor, target: torch.Tensor, items: torch.Tensor, negatives: torch.Tensor, sparse: bool = False
) -> torch.Tensor:
    """Cross-entropy of each row's target against itself and the shared ``negatives`` (uniform
    draws: no logQ correction); a negative equal to the row's target is left out of that row.
    ``sparse``: the gradient of ``items`` holds only the target and negative rows."""
    positives = F.embedding(target, items, sparse=sparse)
    candidates = F.embedding(negatives, items, sparse=sparse)
    return _SampledSoftmax.apply(hidden, positives, candidates, target, negatives)
