"""PyTorch MF: exported vectors, determinism, early stopping, and retrieval quality on planted data."""

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from training.metrics import hit_rate_at_k, popularity_ranking, top_k_unseen
from training.models import mf
from training.models.mf import MatrixFactorization, MFConfig, _seen_csr, train_mf

QUIET = {"show_progress": False, "device": "cpu"}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny problems gain nothing from threads, and spinning threads crawl on busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 20, size=300)
    items = rng.integers(0, 15, size=300)
    return users, items, rng.integers(1, 6, size=300).astype(np.float32)


def planted_problem(n_users: int = 400, n_items: int = 200, per_user: int = 30, seed: int = 0) -> dict:
    """Users pick items by latent affinity plus a popularity term; two random items per user are held out."""
    rng = np.random.default_rng(seed)
    affinity = 2.0 * rng.normal(size=(n_users, 8)) @ rng.normal(size=(8, n_items)) / np.sqrt(8)
    affinity += rng.normal(size=n_items)  # popularity, so the baseline is not trivial
    chosen = np.argsort(-(affinity + rng.gumbel(size=affinity.shape)), axis=1)[:, :per_user]  # sample w/o replacement
    chosen = rng.permuted(chosen, axis=1)  # the Gumbel order is by preference: shuffle before holding out
    return {
        "users": np.repeat(np.arange(n_users), per_user - 2),
        "items": chosen[:, :-2].ravel(),
        "val": (np.arange(n_users), chosen[:, -2]),
        "test": (np.arange(n_users), chosen[:, -1]),
        "n_users": n_users,
        "n_items": n_items,
    }


def random_model(objective: str) -> MatrixFactorization:
    config = MFConfig(objective=objective, dim=6, **QUIET)  # type: ignore[arg-type]
    model = MatrixFactorization(7, 5, config, 3.5, torch.Generator().manual_seed(1), sparse=False)
    with torch.no_grad():  # non-zero biases so folding them is actually tested
        model.item_bias[:, 0] = torch.linspace(2, -2, 5)
        if model.user_bias is not None:
            model.user_bias[:, 0] = torch.linspace(-1, 1, 7)
    return model


@pytest.mark.parametrize("objective", ["rating", "bpr"])
def test_exported_vectors_reproduce_the_model_score(objective: str) -> None:
    model = random_model(objective)
    user_vectors, item_vectors = model.export()
    assert user_vectors.dtype == item_vectors.dtype == np.float32
    assert user_vectors.shape == (7, 8) and item_vectors.shape == (5, 8)
    u, i = np.meshgrid(np.arange(7), np.arange(5), indexing="ij")
    with torch.no_grad():
        own = model.score(torch.from_numpy(u.ravel()), torch.from_numpy(i.ravel())).numpy().reshape(7, 5)
    np.testing.assert_allclose(user_vectors @ item_vectors.T, own, atol=1e-5)
    np.testing.assert_array_equal(user_vectors[:, 1], 1.0)
    np.testing.assert_array_equal(item_vectors[:, 0], 1.0)
    if objective == "bpr":
        np.testing.assert_array_equal(user_vectors[:, 0], 0.0)  # user bias cannot change a ranking
    else:
        np.testing.assert_allclose(user_vectors[:, 0], np.linspace(-1, 1, 7) + 3.5, atol=1e-6)


@pytest.mark.parametrize("objective", ["rating", "bpr"])
def test_training_loss_uses_the_exported_score(objective: str) -> None:
    model = random_model(objective)
    users, items, negatives = torch.tensor([0, 3, 6, 3]), torch.tensor([1, 4, 0, 2]), torch.tensor([2, 2, 3, 0])
    ratings = torch.tensor([1.0, 5.0, 3.0, 4.0])
    with torch.no_grad():
        data_loss, _ = model.batch_loss(users, items, ratings if objective == "rating" else negatives)
        score = model.score(users, items)
        if objective == "rating":
            expected = (score - ratings).square().mean()
        else:
            expected = -torch.nn.functional.logsigmoid(score - model.score(users, negatives)).mean()
    assert float(data_loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("objective", ["rating", "bpr"])
@pytest.mark.parametrize("sparse", [False, True])
def test_same_seed_gives_identical_vectors(objective: str, sparse: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if sparse:  # big catalogs take the SparseAdam path
        monkeypatch.setattr(mf, "_SPARSE_ROWS_PER_BATCH_ROW", 0)
    users, items, ratings = tiny_problem()
    config = MFConfig(objective=objective, dim=4, batch_size=64, seed=3, **QUIET)
    first = train_mf(20, 15, users, items, ratings, config, fixed_epochs=3)
    second = train_mf(20, 15, users, items, ratings, config, fixed_epochs=3)
    other = train_mf(20, 15, users, items, ratings, MFConfig(**{**config.__dict__, "seed": 4}), fixed_epochs=3)
    np.testing.assert_array_equal(first.user_vectors, second.user_vectors)
    np.testing.assert_array_equal(first.item_vectors, second.item_vectors)
    assert not np.array_equal(first.item_vectors, other.item_vectors)
    assert first.history[-1]["loss"] < first.history[0]["loss"]


def test_rating_objective_fits_ratings() -> None:
    rng = np.random.default_rng(0)
    users, items, _ = tiny_problem()
    ratings = (3 + rng.uniform(-1, 1, 20)[users] + rng.uniform(-1, 1, 15)[items]).astype(np.float32)
    config = MFConfig(objective="rating", dim=4, batch_size=64, lr=0.02, reg=0.0, **QUIET)
    result = train_mf(20, 15, users, items, ratings, config, fixed_epochs=40)
    predicted = np.einsum("nd,nd->n", result.user_vectors[users], result.item_vectors[items])
    assert np.sqrt(np.mean((predicted - ratings) ** 2)) < 0.2 * ratings.std()
    assert result.history[-1]["loss"] < 0.1 * result.history[0]["loss"]


def test_fixed_epochs_is_the_refit_mode() -> None:
    users, items, ratings = tiny_problem()
    result = train_mf(20, 15, users, items, ratings, MFConfig(dim=4, epochs=9, **QUIET), fixed_epochs=3)
    assert result.best_epoch == 3 and len(result.history) == 3
    assert set(result.history[0]) == {"epoch", "loss", "seconds"}
    no_validation = train_mf(20, 15, users, items, ratings, MFConfig(dim=4, epochs=2, **QUIET))
    assert no_validation.best_epoch == 2 and len(no_validation.history) == 2


def test_bpr_beats_popularity_on_planted_structure_and_stops_early() -> None:
    data = planted_problem()
    n_users, n_items = data["n_users"], data["n_items"]
    users, items = data["users"], data["items"]
    config = MFConfig(objective="bpr", dim=16, epochs=60, patience=3, batch_size=1024, lr=0.01, **QUIET)
    result = train_mf(n_users, n_items, users, items, np.zeros(len(users)), config, validation=data["val"])

    curve = [h["val_recall@100"] for h in result.history]
    assert result.best_epoch == 1 + int(np.argmax(curve))
    assert len(result.history) == min(config.epochs, result.best_epoch + config.patience)

    # Judge on the test item with train + validation masked, as the pipeline does.
    seen = _seen_csr(np.concatenate([users, data["val"][0]]), np.concatenate([items, data["val"][1]]), n_users, n_items)
    test_users, test_items = data["test"]
    mf_hr = hit_rate_at_k(top_k_unseen(result.user_vectors, result.item_vectors, test_users, *seen, 10), test_items, 10)
    pop_hr = hit_rate_at_k(popularity_ranking(items, n_items, test_users, *seen, 10), test_items, 10)
    assert mf_hr > 1.5 * pop_hr and mf_hr > pop_hr + 0.05, (mf_hr, pop_hr)


def test_seen_csr_deduplicates_and_sorts() -> None:
    indptr, indices = _seen_csr(np.array([2, 0, 2, 2, 0]), np.array([3, 1, 0, 3, 1]), 4, 5)
    assert indptr.dtype == np.int64 and indices.dtype == np.int32
    np.testing.assert_array_equal(indptr, [0, 1, 1, 3, 3])
    np.testing.assert_array_equal(indices, [1, 0, 3])


def test_bad_input_gets_a_clear_error() -> None:
    users, items, ratings = tiny_problem()
    config = MFConfig(dim=4, **QUIET)
    with pytest.raises(ValueError, match="item_idx out of range"):
        train_mf(20, 10, users, items, ratings, config)
    with pytest.raises(ValueError, match="differ in length"):
        train_mf(20, 15, users, items[:-1], ratings, config)
    with pytest.raises(ValueError, match="rating must be"):
        train_mf(20, 15, users, items, ratings[:-1], MFConfig(objective="rating", **QUIET))
    with pytest.raises(ValueError, match="refit mode"):
        train_mf(20, 15, users, items, ratings, config, validation=(users[:2], items[:2]), fixed_epochs=2)
    with pytest.raises(ValueError, match="validation user_idx"):
        train_mf(20, 15, users, items, ratings, config, validation=(np.array([25]), np.array([1])))
    with pytest.raises(ValueError, match="objective"):
        MFConfig(objective="als")  # type: ignore[arg-type]
