"""One rank of test_distributed's comparison: MF and the sequence model on planted data.

Run alone (one process) or under ``torchrun --nproc_per_node 2``; each rank writes
``<out>/rank<RANK>.npz`` with its vectors and its quality on held-out items.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from training.distributed import Distribution, process_group
from training.interactions import Encoded, Histories
from training.metrics import hit_rate_at_k, top_k_unseen
from training.models import mf
from training.models.mf import MFConfig, _seen_csr, train_mf
from training.models.sequence import SequenceConfig, left_padded, train_sequence_model


def planted(n_users: int = 300, n_items: int = 200, per_user: int = 25, seed: int = 0) -> dict:
    """Users pick items by latent affinity plus popularity; the last two are validation and test."""
    rng = np.random.default_rng(seed)
    affinity = 2.0 * rng.normal(size=(n_users, 8)) @ rng.normal(size=(8, n_items)) / np.sqrt(8)
    affinity += rng.normal(size=n_items)
    chosen = np.argsort(-(affinity + rng.gumbel(size=affinity.shape)), axis=1)[:, :per_user]
    chosen = rng.permuted(chosen, axis=1)
    return {
        "users": np.repeat(np.arange(n_users), per_user - 2),
        "items": chosen[:, :-2].ravel(),
        "val": (np.arange(n_users), chosen[:, -2]),
        "test": (np.arange(n_users), chosen[:, -1]),
    }


def cycles(n_users: int = 120, n_items: int = 30, length: int = 14, seed: int = 0) -> list[np.ndarray]:
    """Each user walks a fixed random cycle of the items from a random start, with 20% noise."""
    rng = np.random.default_rng(seed)
    cycle = rng.permutation(n_items)
    out = []
    for _ in range(n_users):
        start = int(rng.integers(n_items))
        walk = [int(cycle[(start + k) % n_items]) for k in range(length)]
        noise = rng.random(length) < 0.2
        walk = [int(rng.integers(n_items)) if n else w for w, n in zip(walk, noise)]
        out.append(np.array(walk, dtype=np.int64))
    return out


def main(out: Path) -> None:
    torch.set_num_threads(1)
    distribution = Distribution.from_environment()
    results: dict[str, np.ndarray] = {}
    with process_group(distribution):
        data = planted()
        n_users, n_items = 300, 200
        seen = _seen_csr(np.concatenate([data["users"], data["val"][0]]),
                         np.concatenate([data["items"], data["val"][1]]), n_users, n_items)
        quiet = {"show_progress": False, "device": "cpu"}
        # Small batches: several steps an epoch; the last batch is smaller than the others.
        fixed = train_mf(n_users, n_items, data["users"], data["items"], np.zeros(len(data["users"])),
                         MFConfig(dim=8, batch_size=256, lr=0.01, **quiet), fixed_epochs=3, distribution=distribution)
        results["mf_fixed_users"], results["mf_fixed_items"] = fixed.user_vectors, fixed.item_vectors
        # The sparse path (LazyAdam, sparse gradients all-reduced by gloo).
        mf._SPARSE_ROWS_PER_BATCH_ROW = 0
        sparse = train_mf(n_users, n_items, data["users"], data["items"], np.zeros(len(data["users"])),
                          MFConfig(dim=8, batch_size=256, lr=0.01, **quiet), fixed_epochs=2, distribution=distribution)
        mf._SPARSE_ROWS_PER_BATCH_ROW = 8
        results["mf_sparse_items"] = sparse.item_vectors
        early = train_mf(n_users, n_items, data["users"], data["items"], np.zeros(len(data["users"])),
                         MFConfig(dim=16, epochs=40, patience=3, batch_size=512, lr=0.01, **quiet),
                         validation=data["val"], distribution=distribution)
        test_users, test_items = data["test"]
        ranked = top_k_unseen(early.user_vectors, early.item_vectors, test_users, *seen, 10)
        results["mf_hr10"] = np.array(hit_rate_at_k(ranked, test_items, 10))
        results["mf_best_epoch"] = np.array(early.best_epoch)
        results["mf_early_items"] = early.item_vectors

        sequences = cycles()
        train = [s[:-1] for s in sequences]
        users = np.repeat(np.arange(len(train)), [len(s) for s in train])
        items = np.concatenate(train)
        histories = Histories.of(
            Encoded(users, items, np.ones(len(items), np.float32), np.concatenate([np.arange(len(s)) for s in train])),
            len(train),
        )
        targets = np.array([s[-1] for s in sequences])

        def hit_rate(model: torch.nn.Module) -> float:
            with torch.no_grad():
                vectors = model.user_vectors(torch.from_numpy(left_padded(train, 8))).numpy()
                scores = vectors @ model.item_vectors.numpy().T
            top = np.argsort(-scores, axis=1)[:, :5]
            return float((top == targets[:, None]).any(axis=1).mean())

        config = SequenceConfig(dim=16, n_blocks=1, max_length=8, epochs=12, patience=3, batch_size=16, lr=1e-2,
                                dropout=0.0, show_progress=False, device="cpu")
        seq = train_sequence_model(histories, 30, config, validate=hit_rate, distribution=distribution)
        results["seq_hr5"] = np.array(hit_rate(seq.model))
        results["seq_best_epoch"] = np.array(seq.best_epoch)
        results["seq_weights"] = np.concatenate([p.detach().numpy().ravel() for p in seq.model.parameters()])
        # The sampled softmax's path: a sparse item table (LazyAdam, gradients all-reduced by gloo).
        sampled = replace(config, full_softmax_max_items=10, sampled_negatives=10)
        seq = train_sequence_model(histories, 30, sampled, validate=hit_rate, distribution=distribution)
        assert seq.model.sparse
        results["seq_sparse_hr5"] = np.array(hit_rate(seq.model))
        results["seq_sparse_weights"] = np.concatenate([p.detach().numpy().ravel() for p in seq.model.parameters()])
    np.savez(out / f"rank{distribution.rank}.npz", **results)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
