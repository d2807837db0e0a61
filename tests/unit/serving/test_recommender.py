"""Retrieval, masking, fallback, filters and the ranking path on the tiny hand-checkable model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support import tiny_model as tiny
from twostage_rec.artifact import load_artifact
from twostage_rec.errors import UserNotFound
from twostage_rec.recommender import TwoStageRecommender, get_recommendations
from twostage_rec.request import Filters, RecommendationRequest
from twostage_rec.retrieval import top_n
from twostage_rec.settings import Settings


@pytest.fixture(scope="module")
def rec(tiny_model_dir: Path) -> TwoStageRecommender:
    return TwoStageRecommender(load_artifact(tiny_model_dir), Settings())


def ids(items: list[dict]) -> list[str]:
    return [i["item_id"] for i in items]


def test_top_n_orders_by_score_and_drops_masked() -> None:
    scores = np.array([0.5, -np.inf, 3.0, 1.0, 3.0], dtype=np.float32)
    got = top_n(scores, 3)
    assert got.item_idx.tolist() == [2, 4, 3]  # tie 2/4 broken by index
    assert top_n(scores, 10).item_idx.tolist() == [2, 4, 3, 0]  # only finite scores


def test_alice_gets_unseen_items_in_mf_order(rec: TwoStageRecommender) -> None:
    # alice = [0,1,1,0]: scores i0..i5 = 5,4,3,2,1,0; i0 is seen.
    got = rec.recommend(RecommendationRequest("alice", top_k=3, num_candidates=5))
    assert ids(got.items) == ["i1", "i2", "i3"]
    assert got.fallback is None and got.degraded is False
    assert [i["rank"] for i in got.items] == [1, 2, 3]
    assert all(0.0 <= i["predicted_rating"] <= 5.0 for i in got.items)


def test_seen_items_masked_before_top_k_so_count_is_exact(rec: TwoStageRecommender) -> None:
    retrieved = rec._retriever.retrieve([1], [5], [np.empty(0, np.int64)], [None])[0]
    assert len(retrieved.item_idx) == 5 and 5 not in retrieved.item_idx.tolist()
    np.testing.assert_allclose(retrieved.mf_score, np.sort(tiny.mf_scores(1)[retrieved.item_idx])[::-1])


def test_exclude_items_and_filters(rec: TwoStageRecommender) -> None:
    got = rec.recommend(
        RecommendationRequest("alice", top_k=10, num_candidates=10, exclude_items=("i1", "nope"),
                              filters=Filters(include_categories=("even",)))
    )
    assert ids(got.items) == ["i2", "i4"]  # even items unseen and not excluded, in MF order
    priced = rec.recommend(RecommendationRequest("alice", top_k=10, filters=Filters(min_price=25, max_price=45)))
    assert ids(priced.items) == ["i2", "i3"]  # prices 30, 40


def test_unknown_user_falls_back_to_popularity_with_filters(rec: TwoStageRecommender) -> None:
    got = rec.recommend(RecommendationRequest("zed", top_k=3, exclude_items=("i2",)))
    assert got.fallback == "popular"
    assert ids(got.items) == ["i3", "i1", "i4"]
    assert got.items[0]["predicted_rating"] == pytest.approx(3.7)  # i3's average rating
    with pytest.raises(UserNotFound):
        rec.recommend(RecommendationRequest("zed", on_unknown_user="error"))


def test_batch_keeps_order_and_matches_single_requests(rec: TwoStageRecommender) -> None:
    reqs = [RecommendationRequest(u, top_k=4) for u in ("carol", "zed", "alice", "bob")]
    batch = rec.recommend_many(reqs)
    assert [b.user_id for b in batch] == ["carol", "zed", "alice", "bob"]
    for request, answer in zip(reqs, batch):
        assert answer.items == rec.recommend(request).items


def test_get_recommendations_api(rec: TwoStageRecommender) -> None:
    got = get_recommendations("bob", rec, top_k=2)
    assert ids(got) == ["i4", "i3"]
    assert set(got[0]) >= {"item_id", "predicted_rating"}
