"""The ranker's input on the tiny model: every candidate feature checked by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support import tiny_model as tiny
from twostage_rec import schema
from twostage_rec.artifact import load_artifact
from twostage_rec.candidate_features import CandidateFeatureBuilder
from twostage_rec.history import UserHistory
from twostage_rec.sources import Query
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
