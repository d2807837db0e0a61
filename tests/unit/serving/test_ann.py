"""The IVF index, exact vs approximate retrieval with masking, the artifact round trip, the
packaging-time recall and the serving choice between them."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from training.ann_index import SyntheticFactors, build_ann_index, with_ann_index
from twostage_rec.ann import IvfIndex
from twostage_rec.artifact import (
    ANN_FILES,
    ANN_VECTORS,
    MANIFEST,
    RANKER,
    RATING_MODEL,
    ArtifactError,
    ArtifactParts,
    load_artifact,
    write_artifact,
)
from twostage_rec.retrieval import AnnRetriever, ExactRetriever, make_retriever, top_n, top_n_rows
from twostage_rec.settings import Settings, SettingsError

NONE = np.empty(0, dtype=np.int64)


def blocked(source: SyntheticFactors, u: int, excluded: np.ndarray = NONE) -> np.ndarray:
    """What the recommender blocks for user ``u``: their seen items and the exclusions."""
    seen = source.seen_indices[source.seen_indptr[u] : source.seen_indptr[u + 1]].astype(np.int64)
    return np.concatenate([seen, np.asarray(excluded, dtype=np.int64)])


def top(retriever, source: SyntheticFactors, users: list[int], n: list[int], excluded, allowed):  # noqa: ANN001, ANN201
    """The retriever's answers for users' MF vectors, their seen items and ``excluded`` blocked."""
    return retriever.top(
        source.user_factors[users], n, [blocked(source, u, e) for u, e in zip(users, excluded)], allowed
    )


@pytest.fixture(scope="module")
def catalog() -> SyntheticFactors:
    return SyntheticFactors.generate(n_items=20_000, n_users=40, dim=16, seed=3)


@pytest.fixture(scope="module")
def index(catalog: SyntheticFactors) -> IvfIndex:
    return IvfIndex.build(catalog.item_factors, seed=0)


def brute_force(
    source: SyntheticFactors, u: int, n: int, excluded: np.ndarray = NONE, allowed: np.ndarray | None = None
) -> tuple[list[int], np.ndarray]:
    """The reference: every score, masked items dropped, sorted by (-score, item index)."""
    scores = source.item_factors.astype(np.float64) @ source.user_factors[u].astype(np.float64)
    keep = np.ones(len(scores), dtype=bool)
    keep[source.seen_indices[source.seen_indptr[u] : source.seen_indptr[u + 1]]] = False
    keep[excluded] = False
    if allowed is not None:
        keep &= allowed
    idx = np.flatnonzero(keep)
    order = np.lexsort((idx, -scores[idx]))[:n]
    return idx[order].tolist(), scores[idx[order]]


# --- top_n and the exact retriever ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_top_n_fast_path_equals_a_full_sort_including_ties_and_masks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=50_000), 2).astype(np.float32)  # many ties
    scores[rng.random(50_000) < 0.3] = -np.inf
    for n in (1, 7, 100, 1000):
        got = top_n(scores, n)
        finite = np.flatnonzero(np.isfinite(scores))
        want = finite[np.lexsort((finite, -scores[finite]))][:n]
        assert got.item_idx.tolist() == want.tolist()
        np.testing.assert_array_equal(got.score, scores[want])


def test_top_n_with_fewer_finite_scores_than_n_and_explicit_item_ids() -> None:
    scores = np.full(10_000, -np.inf, dtype=np.float32)
    scores[[5, 9, 7000]] = [1.0, 2.0, 2.0]
    assert top_n(scores, 100).item_idx.tolist() == [9, 7000, 5]
    ids = np.arange(10_000)[::-1].copy()  # position p is item 9999 - p
    assert top_n(scores, 2, ids).item_idx.tolist() == [2999, 9990]  # tie -> lower item index
    assert len(top_n(scores, 0).item_idx) == 0


@pytest.mark.parametrize(("seed", "width"), [(0, 3000), (1, 3000), (2, 500), (3, 10_000)])
def test_top_n_rows_equals_top_n_of_each_row_with_ties_masks_and_any_n(seed: int, width: int) -> None:
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=(12, width)), 1).astype(np.float32)  # ties at every cut
    scores[rng.random(scores.shape) < 0.3] = -np.inf
    scores[0, rng.random(width) < 0.99] = -np.inf  # fewer finite scores than n
    scores[1] = -np.inf
    scores[2, :5] = [np.nan, np.inf, np.nan, -np.inf, np.inf]  # never returned, as by top_n
    n = [100, 100, 7, 1, 0, width, width + 5, 100, 50, 100, 2, 100]
    got = top_n_rows(scores.copy(), n)  # 10,000 wide: top_n row by row (its sampled threshold)
    assert len(got) == len(n)
    for row, m, found in zip(scores, n, got):
        want = top_n(row.copy(), m)
        assert found.item_idx.tolist() == want.item_idx.tolist()
        np.testing.assert_array_equal(found.score, want.score)
        assert found.item_idx.dtype == np.int64 and found.score.dtype == np.float32
    assert top_n_rows(np.empty((0, width), dtype=np.float32), []) == []


def test_exact_retrieval_on_a_small_catalog_equals_brute_force_with_masks_and_filters() -> None:
    rng = np.random.default_rng(4)
    items = rng.normal(size=(800, 8)).astype(np.float32)
    vectors = rng.normal(size=(30, 8)).astype(np.float32)
    blocked = [rng.choice(800, int(k), replace=False) for k in rng.integers(0, 700, 30)]
    allowed = [None if q % 2 else rng.random(800) < 0.5 for q in range(30)]
    n = [int(k) for k in rng.integers(1, 120, 30)]
    got = ExactRetriever(items).top(vectors, n, blocked, allowed)
    for q, found in enumerate(got):
        scores = (vectors[q : q + 1] @ items.T)[0]  # the same float32 product as the retriever's
        keep = np.ones(800, dtype=bool)
        keep[blocked[q]] = False
        if allowed[q] is not None:
            keep &= allowed[q]
        idx = np.flatnonzero(keep)
        want = idx[np.lexsort((idx, -scores[idx]))][: n[q]]
        assert found.item_idx.tolist() == want.tolist()


def test_exact_retrieval_equals_brute_force_with_seen_excluded_and_filters(catalog: SyntheticFactors) -> None:
    rng = np.random.default_rng(0)
    users = list(range(len(catalog.user_factors)))  # > one chunk of users
    excluded = [rng.choice(20_000, 30, replace=False) for _ in users]
    allowed = [None if u % 3 == 0 else rng.random(20_000) < 0.2 for u in users]
    got = top(ExactRetriever(catalog.item_factors), catalog, users, [100] * len(users), excluded, allowed)
    for u, c in zip(users, got):
        want, want_scores = brute_force(catalog, u, 100, excluded[u], allowed[u])
        assert c.item_idx.tolist() == want
        np.testing.assert_allclose(c.score, want_scores, rtol=1e-5, atol=1e-4)


# --- the index ---------------------------------------------------------------------------------


def test_index_is_a_deterministic_permutation_of_the_items(catalog: SyntheticFactors, index: IvfIndex) -> None:
    n_items = len(catalog.item_factors)
    assert sorted(index.item_idx.tolist()) == list(range(n_items))
    assert index.list_offsets[0] == 0 and index.list_offsets[-1] == n_items
    assert np.all(np.diff(index.list_offsets) >= 0)
    assert index.centroids.shape == (index.n_lists, catalog.item_factors.shape[1] + 1)
    np.testing.assert_array_equal(index.vectors, catalog.item_factors[index.item_idx])
    again = IvfIndex.build(catalog.item_factors, seed=0)
    np.testing.assert_array_equal(again.item_idx, index.item_idx)


def test_scanning_every_cell_scores_every_item_with_the_folded_inner_product(
    catalog: SyntheticFactors, index: IvfIndex
) -> None:
    u = catalog.user_factors[0]
    item_idx, scores = index.scan(u, index.n_lists)
    assert sorted(item_idx.tolist()) == list(range(len(catalog.item_factors)))
    np.testing.assert_allclose(scores, catalog.item_factors[item_idx] @ u, rtol=1e-5, atol=1e-4)


def test_ann_recall_at_100_is_high_with_seen_items_masked(catalog: SyntheticFactors, index: IvfIndex) -> None:
    users = list(range(len(catalog.user_factors)))
    ann = top(AnnRetriever(catalog.item_factors, index, n_probe=index.n_lists // 4), catalog, users,
              [100] * len(users), [NONE] * len(users), [None] * len(users))
    hits = [len(set(c.item_idx.tolist()) & set(brute_force(catalog, u, 100)[0])) for u, c in zip(users, ann)]
    recall = np.mean(hits) / 100
    assert recall >= 0.9


@pytest.mark.parametrize("seen_share", [0.0, 0.5, 0.97])
@pytest.mark.parametrize("allowed_share", [None, 0.3, 0.02])
def test_ann_returns_exactly_n_unmasked_items_or_all_that_remain(
    seen_share: float, allowed_share: float | None
) -> None:
    """Many seen items, active filters, exclusions: never a masked item, always min(n, left)."""
    base = SyntheticFactors.generate(n_items=8_000, n_users=6, dim=8, seed=1)
    rng = np.random.default_rng(7)
    seen = [np.flatnonzero(rng.random(8_000) < seen_share) for _ in range(6)]
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in seen])]).astype(np.int64)
    catalog = replace(base, seen_indptr=indptr, seen_indices=np.concatenate(seen).astype(np.int32))
    index = IvfIndex.build(catalog.item_factors, seed=0)
    retriever = AnnRetriever(catalog.item_factors, index, n_probe=4)
    for u in range(6):
        excluded = rng.choice(8_000, 50, replace=False)
        allowed = None if allowed_share is None else rng.random(8_000) < allowed_share
        for n in (1, 100, 1000):
            got = top(retriever, catalog, [u], [n], [excluded], [allowed])[0]
            want, _ = brute_force(catalog, u, 10**9, excluded, allowed)
            assert len(got.item_idx) == min(n, len(want))
            assert set(got.item_idx.tolist()) <= set(want)  # nothing seen, excluded or filtered
            assert np.all(np.diff(got.score) <= 0)
            exact_scores = catalog.item_factors[got.item_idx] @ catalog.user_factors[u]
            np.testing.assert_allclose(got.score, exact_scores, rtol=1e-5, atol=1e-4)


def test_ann_batch_keeps_request_order_when_some_users_fall_back_to_exact(
    catalog: SyntheticFactors, index: IvfIndex
) -> None:
    only_a_few = np.zeros(20_000, dtype=bool)
    only_a_few[:150] = True  # 0.75% of the catalog: scored exactly
    users = [0, 1, 2]
    got = top(AnnRetriever(catalog.item_factors, index, n_probe=8), catalog, users, [10] * 3, [NONE] * 3,
              [None, only_a_few, None])
    for u, c, allowed in zip(users, got, [None, only_a_few, None]):
        if allowed is not None:
            assert c.item_idx.tolist() == brute_force(catalog, u, 10, allowed=allowed)[0]
        assert len(c.item_idx) == 10


# --- packaging, artifact, serving choice -----------------------------------------------------


def parts_from(model_dir: Path, catalog: SyntheticFactors) -> ArtifactParts:
    """The tiny model's parts with a larger synthetic catalog's factors and seen items."""
    a = load_artifact(model_dir)
    n_users, n_items = len(catalog.user_factors), len(catalog.item_factors)
    m = a.manifest
    sources = {name: own for name, own in m.sources.items() if name != "sequence"}  # no sequence model
    manifest = replace(m, n_users=n_users, n_items=n_items, factor_dim=catalog.item_factors.shape[1], files={},
                       sources=sources, sequence_model=None)
    return ArtifactParts(
        manifest=manifest,
        user_ids=[f"u{i}" for i in range(n_users)],
        item_ids=[f"i{i}" for i in range(n_items)],
        user_factors=catalog.user_factors,
        item_factors=catalog.item_factors,
        seen_indptr=catalog.seen_indptr,
        seen_indices=catalog.seen_indices,
        seen_timestamps=np.zeros(len(catalog.seen_indices), dtype=np.int64),
        seen_rating_sums=np.zeros(len(catalog.seen_indices)),
        item_timeline_indptr=np.zeros(n_items + 1, dtype=np.int64),
        item_timeline_timestamps=np.empty(0, dtype=np.int64),
        item_timeline_rating_sums=np.empty(0),
        item_features=np.zeros((n_items, len(m.item_feature_names)), dtype=np.float32),
        popular_items=catalog.popular_items,
        neighbour_indptr=np.zeros(n_items + 1, dtype=np.int64),
        neighbour_items=np.empty(0, dtype=np.int32),
        neighbour_scores=np.empty(0, dtype=np.float32),
        ranker_bytes=(model_dir / RANKER).read_bytes(),
        rating_model_bytes=(model_dir / RATING_MODEL).read_bytes(),
    )


@pytest.fixture(scope="module")
def ann_model_dir(tiny_model_dir: Path, catalog: SyntheticFactors, tmp_path_factory: pytest.TempPathFactory) -> Path:
    parts = with_ann_index(parts_from(tiny_model_dir, catalog), min_items=0, target_recall=0.9, sample_users=40)
    model_dir = tmp_path_factory.mktemp("ann") / "model"
    write_artifact(parts, model_dir)
    return model_dir


def test_packaging_stores_the_index_with_checksums_and_its_measured_recall(ann_model_dir: Path) -> None:
    manifest = json.loads((ann_model_dir / MANIFEST).read_text())
    assert all(name in manifest["files"] for name in ANN_FILES)
    ann = manifest["extra"]["ann"]
    assert ann["kind"] == "ivf" and ann["metric"] == "inner_product"
    assert ann["recall_at_100"] >= 0.9 and ann["recall_users"] == 40
    assert 1 <= ann["n_probe"] <= ann["n_lists"]
    loaded = load_artifact(ann_model_dir).ann_index
    assert loaded is not None and isinstance(loaded.vectors, np.memmap)


def test_small_catalogs_get_no_index(tiny_model_dir: Path, catalog: SyntheticFactors) -> None:
    parts = parts_from(tiny_model_dir, catalog)
    assert with_ann_index(parts) is parts  # 20k items < the 200k default


def test_the_recall_reported_is_the_recall_of_the_probe_count_chosen(catalog: SyntheticFactors) -> None:
    users = list(range(10))
    index, meta = build_ann_index(  # an unreachable target
        catalog.item_factors, catalog.user_factors[users], [blocked(catalog, u) for u in users], target_recall=1.01
    )
    assert meta["n_probe"] == -(-index.n_lists // 4)  # the largest tried, ceil(n_lists / 4)
    assert 0.5 < meta["recall_at_100"] <= 1.0


def test_make_retriever_picks_ann_only_for_large_catalogs_with_enough_recall(
    ann_model_dir: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def make(a, settings: Settings):  # noqa: ANN001, ANN202
        return make_retriever(a.item_factors, a.ann_index, a.manifest.extra.get("ann"), settings, "MF")

    artifact = load_artifact(ann_model_dir)
    assert isinstance(make(artifact, Settings(ann_min_items=1000, ann_min_recall=0.9)), AnnRetriever)
    assert type(make(artifact, Settings())) is ExactRetriever  # 20k < 200k
    assert type(make(load_artifact(tiny_model_dir), Settings(ann_min_items=0))) is ExactRetriever
    with caplog.at_level(logging.INFO, logger="twostage_rec.retrieval"):
        assert type(make(artifact, Settings(ann_min_items=1000, ann_min_recall=1.0))) is ExactRetriever
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "ANN_MIN_RECALL=1" in lines[0] and "exact" in lines[0]


def test_an_incomplete_or_misshapen_index_is_a_clear_artifact_error(ann_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(ann_model_dir, broken)
    manifest = json.loads((broken / MANIFEST).read_text())
    del manifest["files"][ANN_VECTORS]
    (broken / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="ANN index needs all of"):
        load_artifact(broken, verify_checksums=False)
    manifest["files"][ANN_VECTORS] = "0"
    (broken / MANIFEST).write_text(json.dumps(manifest))
    np.save(broken / ANN_VECTORS, np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ArtifactError, match=f"{ANN_VECTORS}: shape"):
        load_artifact(broken, verify_checksums=False)


def test_ann_settings_come_from_the_environment() -> None:
    s = Settings.from_env({"ANN_MIN_ITEMS": "1000", "ANN_MIN_RECALL": "0.9", "ANN_N_PROBE": "64"})
    assert (s.ann_min_items, s.ann_min_recall, s.ann_n_probe) == (1000, 0.9, 64)
    assert (Settings().ann_min_items, Settings().ann_min_recall, Settings().ann_n_probe) == (200_000, 0.95, 0)
    with pytest.raises(SettingsError, match="ANN_MIN_RECALL"):
        Settings.from_env({"ANN_MIN_RECALL": "1.5"})


def test_the_recommender_serves_through_the_ann_index(ann_model_dir: Path) -> None:
    from twostage_rec.recommender import TwoStageRecommender
    from twostage_rec.request import RecommendationRequest

    artifact = load_artifact(ann_model_dir)
    recommender = TwoStageRecommender(artifact, Settings(ann_min_items=1000, ann_min_recall=0.9))
    assert isinstance(recommender._sources[0]._retriever, AnnRetriever)  # the MF source
    user_idx = 3
    seen = set(artifact.seen_indices[artifact.seen_indptr[user_idx] : artifact.seen_indptr[user_idx + 1]].tolist())
    answer = recommender.recommend(RecommendationRequest(artifact.user_ids[user_idx], top_k=20, num_candidates=200))
    returned = [artifact.item_ids.index(i["item_id"]) for i in answer.items]
    assert len(returned) == 20 and not seen & set(returned)
