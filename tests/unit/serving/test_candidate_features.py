"""The ranker's input on the tiny model: every candidate feature checked by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support import tiny_model as tiny
from twostage_rec import candidate_features, schema
from twostage_rec.artifact import load_artifact
from twostage_rec.candidate_features import CandidateFeatureBuilder
from twostage_rec.history import UserHistory
from twostage_rec.sources import Query
from twostage_rec.sources.merge import MergedCandidates
from twostage_rec.sources.neighbours import NeighbourLists
from twostage_rec.sources.assembly import make_feature_builder, make_merger, make_sources, neighbour_lists
from twostage_rec.settings import Settings

NAMES = tiny.CANDIDATE_NAMES


@pytest.fixture(scope="module")
def parts(tiny_model_dir: Path):  # noqa: ANN201
    artifact = load_artifact(tiny_model_dir)
    return artifact, tiny.feature_builder(artifact), make_sources(artifact, Settings()), make_merger(artifact)


def test_every_candidate_feature_of_one_query(parts) -> None:  # noqa: ANN001
    artifact, builder, sources, merger = parts
    history = UserHistory(np.array([2, 0]), np.array([50, 100]))  # i2 then i0 (latest)
    query = Query(0, history, np.array([0, 2]), None, 4)
    merged = merger.merge([query], {s.name: s.run([query]) for s in sources})
    items = merged[0].item_idx
    user_row = np.array([[4.0, 10.0]], dtype=np.float32)
    item_rows = np.asarray(artifact.item_features)[items]
    x = builder.matrix([query], merged, [100 + 7200], user_row, item_rows)
    col = {n: x[:, c] for c, n in enumerate(NAMES)}

    assert len(items) == 4 and not {0, 2} & set(items.tolist())
    np.testing.assert_allclose(col[schema.MF_SCORE], tiny.mf_scores(0)[items], rtol=1e-6)
    np.testing.assert_array_equal(col[schema.FUSION_SCORE], merged[0].fusion_score)
    # Co-occurrence: i0 -> i1 0.9 (last item); i2 -> i0 only; so the last 1 and 5 agree.
    cooc = {1: 0.9, 3: 0.0, 4: 0.0, 5: 0.0}
    np.testing.assert_allclose(col[schema.COOC_LAST_1], [cooc[i] for i in items])
    np.testing.assert_allclose(col[schema.COOC_LAST_5], [cooc[i] for i in items])
    vectors = artifact.sequence_item_vectors
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(col[schema.EMB_SIM_LAST_1], unit[items] @ unit[0], rtol=1e-5)
    mean = (unit[0] + unit[2]) / 2
    np.testing.assert_allclose(col[schema.EMB_SIM_LAST_5], unit[items] @ (mean / np.linalg.norm(mean)), rtol=1e-5)
    np.testing.assert_allclose(col[schema.HOURS_SINCE_LAST], 2.0)
    np.testing.assert_allclose(col[schema.HISTORY_LENGTH], 2.0)
    # History i2, i0: both category 0 ("even"): even candidates share 1.0, odd ones 0.0.
    np.testing.assert_allclose(col[schema.CATEGORY_SHARE], [1.0 - i % 2 for i in items])
    np.testing.assert_allclose(col[schema.USER_MEAN_RATING], 4.0)
    np.testing.assert_allclose(col[schema.PRICE], 10.0 * (items + 1))
    ranks = col[schema.NEIGHBOURS_RANK]
    assert ranks[items.tolist().index(1)] == 0 and np.isnan(ranks[items.tolist().index(3)])


def test_a_user_without_history_or_vector_leaves_those_features_missing(parts) -> None:  # noqa: ANN001
    artifact, builder, sources, merger = parts
    query = Query(-1, UserHistory.empty(), np.empty(0, np.int64), None, 3)
    merged = merger.merge([query], {s.name: s.run([query]) for s in sources})
    assert merged[0].item_idx.tolist() == tiny.POPULAR[:3]  # nothing to say: the popularity fill
    x = builder.matrix(
        [query],
        merged,
        [0],
        np.full((1, 2), np.nan, np.float32),
        np.asarray(artifact.item_features)[merged[0].item_idx],
    )
    col = {n: x[:, c] for c, n in enumerate(NAMES)}
    for name in (
        schema.MF_SCORE,
        schema.SEQUENCE_SCORE,
        schema.COOC_LAST_1,
        schema.HOURS_SINCE_LAST,
        schema.CATEGORY_SHARE,
        schema.USER_MEAN_RATING,
    ):
        assert np.isnan(col[name]).all(), name
    assert (col[schema.HISTORY_LENGTH] == 0).all()


def test_the_artifact_builder_follows_the_manifest_order(tiny_model_dir: Path) -> None:
    builder = make_feature_builder(load_artifact(tiny_model_dir))
    assert builder.names == tiny.RANKER_FEATURES
    with pytest.raises(ValueError, match="neither candidate, user nor item"):
        CandidateFeatureBuilder(["nope"], [], [], builder._neighbours, builder._vectors, None)


def test_a_builder_over_fewer_names_gives_the_same_columns(parts) -> None:  # noqa: ANN001
    # The ablation without history features takes the full matrix's columns instead of a second build.
    artifact, builder, sources, merger = parts
    query = Query(0, UserHistory(np.array([2, 0]), np.array([50, 100])), np.array([0, 2]), None, 4)
    merged = merger.merge([query], {s.name: s.run([query]) for s in sources})
    item_rows = np.asarray(artifact.item_features)[merged[0].item_idx]
    user_row = np.array([[4.0, 10.0]], dtype=np.float32)
    full = builder.matrix([query], merged, [7300], user_row, item_rows)
    names = [n for n in NAMES if n not in (schema.COOC_LAST_5, schema.EMB_SIM_LAST_1, schema.CATEGORY_SHARE)]
    fewer = CandidateFeatureBuilder(
        names,
        tiny.USER_FEATURES,
        tiny.ITEM_FEATURES,
        neighbour_lists(artifact),
        artifact.sequence_item_vectors,
        np.array([0, 1, 0, 1, 0, 1], dtype=np.float32),
    ).matrix([query], merged, [7300], user_row, item_rows)
    np.testing.assert_array_equal(fewer, full[:, [NAMES.index(n) for n in names]])


@pytest.mark.parametrize("dense", [True, False])
def test_co_occurrence_counts_each_neighbour_in_every_window_that_holds_its_age(
    dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not dense:  # the sorted search a large catalog takes
        monkeypatch.setattr(candidate_features, "DENSE_KEYS", 0)
    # Neighbours: i10 -> i1 1.0, i7 4.0 (not a candidate); i11 -> i1 0.5, i2 2.0; i12 -> i1 0.25;
    # i13 -> i2 0.125; no others.
    lists = NeighbourLists(
        indptr=np.array([0] * 11 + [2, 4, 5] + [6] * 16, dtype=np.int64),
        items=np.array([1, 7, 1, 2, 1, 2], dtype=np.int32),
        scores=np.array([1.0, 4.0, 0.5, 2.0, 0.25, 0.125], dtype=np.float32),
    )
    windows = [schema.COOC_LAST_1, schema.COOC_LAST_5, schema.COOC_LAST_20]
    builder = CandidateFeatureBuilder(windows, [], [], lists, np.eye(29, 4, dtype=np.float32), None)
    # Oldest first. Ages (0 = latest): i10 0, i13 1, i11 4, i12 5 (just out of the last 5).
    history = np.array([21, 20, 12, 11, 25, 26, 13, 10])
    query = Query(0, UserHistory(history, np.arange(8)), history, None, 3)
    merged = MergedCandidates(np.array([1, 2, 5]), np.zeros(3, dtype=np.float32), {}, {})
    x = builder.matrix([query], [merged], [100], np.empty((1, 0), np.float32), np.empty((3, 0), np.float32))
    np.testing.assert_allclose(x[:, 0], [1.0, 0.0, 0.0])  # the last item: i10
    np.testing.assert_allclose(x[:, 1], [1.5, 2.125, 0.0])  # the last 5: i10, i13, i11
    np.testing.assert_allclose(x[:, 2], [1.75, 2.125, 0.0])  # the last 20: i12 too
