"""Stage 1, masking, fallback, filters, fresh history and the ranking path on the tiny hand-checkable model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support import tiny_model as tiny
from twostage_rec.artifact import load_artifact
from twostage_rec.errors import UserNotFound
from twostage_rec.recommender import TwoStageRecommender, get_recommendations
from twostage_rec.request import Filters, RecentItem, RecommendationRequest
from twostage_rec.retrieval import top_n
from twostage_rec.settings import Settings


@pytest.fixture(scope="module")
def rec(tiny_model_dir: Path) -> TwoStageRecommender:
    return TwoStageRecommender(load_artifact(tiny_model_dir), Settings())


NOW = 10_000  # after all of the tiny model's data (tiny.DATA_END)


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
    mf = rec._sources[0]
    query = rec._query(RecommendationRequest("bob", num_candidates=5), rec._stored_history(1, NOW), NOW)
    retrieved = mf.run([query])[0]
    assert len(retrieved.item_idx) == 5 and 5 not in retrieved.item_idx.tolist()
    np.testing.assert_allclose(retrieved.score, np.sort(tiny.mf_scores(1)[retrieved.item_idx])[::-1])
    merged = rec._merger.merge([query], {s.name: s.run([query]) for s in rec._sources})[0]
    assert sorted(merged.item_idx.tolist()) == [0, 1, 2, 3, 4]  # exactly n, bob's i5 never


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


def test_the_model_has_all_three_sources(rec: TwoStageRecommender) -> None:
    assert rec.source_names == ["mf", "item_neighbours", "sequence"]


def test_recent_items_are_never_recommended_and_unknown_ones_are_counted(rec: TwoStageRecommender) -> None:
    got = rec.recommend(RecommendationRequest("alice", top_k=10, recent_items=(RecentItem("i1"), RecentItem("nope"))))
    assert "i1" not in ids(got.items) and "i0" not in ids(got.items)
    assert got.ignored_recent_items == 1 and got.fallback is None


def test_an_unknown_user_with_recent_items_gets_history_based_recommendations(rec: TwoStageRecommender) -> None:
    got = rec.recommend(RecommendationRequest("zed", top_k=3, recent_items=(RecentItem("i4", 1_000),)))
    assert got.fallback is None and "i4" not in ids(got.items)
    # Only unknown ids: nothing to personalise with, so the popularity fallback.
    cold = rec.recommend(RecommendationRequest("zed", top_k=3, recent_items=(RecentItem("nope"),)))
    assert cold.fallback == "popular" and cold.ignored_recent_items == 1


def test_a_new_interaction_changes_the_history_sources(rec: TwoStageRecommender) -> None:
    at = np.array([10_000])
    before = rec._histories([RecommendationRequest("alice")], as_of=at, deadline=float("inf")).histories[0]
    after = rec._histories(
        [RecommendationRequest("alice", recent_items=(RecentItem("i4", 5_000),))], as_of=at, deadline=float("inf")
    ).histories[0]
    assert before.item_idx.tolist() == [0] and after.item_idx.tolist() == [0, 4]
    queries = [rec._query(RecommendationRequest("alice", num_candidates=5), h, 10_000) for h in (before, after)]
    neighbours = rec._sources[1].run(queries)
    assert neighbours[0].item_idx.tolist() == [1, 2]  # i0's neighbours
    assert neighbours[1].item_idx.tolist() == [5, 1, 2]  # i4 is now the latest: its neighbour i5 first
    sequence = rec._sources[2].run(queries)
    assert not np.allclose(sequence[0].score_items(np.arange(6)), sequence[1].score_items(np.arange(6)))


def test_sort_by_predicted_rating_orders_by_the_rating_model(rec: TwoStageRecommender) -> None:
    # carol has seen nothing: all six items are candidates, so both orders show the same six.
    got = rec.recommend(RecommendationRequest("carol", top_k=6, sort_by="predicted_rating"))
    ratings = [i["predicted_rating"] for i in got.items]
    assert ratings == sorted(ratings, reverse=True)
    by_score = rec.recommend(RecommendationRequest("carol", top_k=6))
    assert set(ids(got.items)) == set(ids(by_score.items)) and len(got.items) == 6


class _History:
    """A fresh-history source answering from a dict, like the Feature Store reader."""

    def __init__(self, events: dict[str, list[tuple[str, int]]], degraded: bool = False) -> None:
        self.events, self.degraded, self.calls = events, degraded, 0

    def get(self, user_ids, deadline):  # noqa: ANN001, ANN201
        from twostage_rec.history_store import HistoryBatch, HistoryEvent

        self.calls += 1
        found = {u: [HistoryEvent(i, t) for i, t in self.events[u]] for u in user_ids if u in self.events}
        return HistoryBatch(found, self.degraded)


def test_fresh_events_from_feature_store_join_the_history(tiny_model_dir: Path) -> None:
    store = _History({"bob": [("i5", 200), ("i0", 300), ("gone", 400)]})
    rec = TwoStageRecommender(load_artifact(tiny_model_dir), Settings(), fresh_history=store)
    got = rec.recommend_many([RecommendationRequest("bob", top_k=5), RecommendationRequest("zed", top_k=2)])
    assert store.calls == 1  # one read for the whole batch
    assert "i0" not in ids(got[0].items) and "i5" not in ids(got[0].items)
    assert got[0].degraded is False
    degraded = TwoStageRecommender(load_artifact(tiny_model_dir), Settings(), fresh_history=_History({}, True))
    assert degraded.recommend(RecommendationRequest("bob")).degraded is True


def test_serving_never_imports_torch(tiny_model_dir: Path) -> None:
    """The image has no torch: loading a model with a sequence model and answering must not need it."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from twostage_rec.handler import load_service\n"
        "from twostage_rec.request import RecommendationRequest\n"
        f"service = load_service({str(tiny_model_dir)!r})\n"
        "service.recommender.recommend(RecommendationRequest('alice', top_k=3))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    code_dir = Path(__file__).resolve().parents[3] / "code"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={"PYTHONPATH": str(code_dir), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr


def test_awkward_histories_get_sensible_answers(rec: TwoStageRecommender) -> None:
    # A history of one item without neighbours (i3), for a user the model does not know: the
    # sequence source still has an opinion; no error, a full list.
    lonely = rec.recommend(RecommendationRequest("zed", top_k=4, recent_items=(RecentItem("i3"),)))
    assert lonely.fallback is None and len(lonely.items) == 4 and "i3" not in ids(lonely.items)
    # A known user with a single interaction.
    assert len(rec.recommend(RecommendationRequest("bob", top_k=5)).items) == 5
    # Every item seen: nothing left to recommend is an empty list, not an error.
    everything = tuple(RecentItem(f"i{i}") for i in range(6))
    assert rec.recommend(RecommendationRequest("carol", recent_items=everything)).items == []


def test_a_new_workers_first_request_does_not_spend_its_feature_store_budget_on_the_client(
    tiny_model_dir: Path,
) -> None:
    # Building a boto3 client takes ~200 ms in a fresh worker: as long as the whole 200 ms budget.
    # It happens before the budget starts, once for both readers, and the first answer is whole.
    import time

    import boto3
    from botocore.stub import Stubber

    from twostage_rec.features import RuntimeResources

    settings = Settings(feature_source="featurestore", feature_group_name="tiny-items", region="us-east-1",
                        user_history_feature_group_name="tiny-user-history", feature_store_deadline_ms=200,
                        feature_store_parallelism=1)
    client = boto3.client("sagemaker-featurestore-runtime", region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="y")
    stub = Stubber(client)
    stub.add_response("batch_get_record", {"Records": [], "Errors": [], "UnprocessedIdentifiers": []})  # history
    stub.add_response("batch_get_record", {"Records": [], "Errors": [], "UnprocessedIdentifiers": []})  # items
    built = []

    def slow_client(_settings: Settings) -> object:
        time.sleep(0.3)
        built.append(1)
        return client

    rec = TwoStageRecommender(load_artifact(tiny_model_dir), settings,
                              feature_store=RuntimeResources(settings, client_factory=slow_client))
    with stub:
        got = rec.recommend(RecommendationRequest("alice", top_k=3))
        stub.assert_no_pending_responses()
    assert got.degraded is False and len(got.items) == 3
    assert built == [1]


# --- as_of: the answer for a moment, with nothing after it ------------------------------------


def test_as_of_hides_later_interactions_from_history_and_seen(rec: TwoStageRecommender) -> None:
    # bob saw i5 at t=200 (tiny.HISTORY): before that he has no history and has seen nothing.
    later = rec.recommend(RecommendationRequest("bob", top_k=6, as_of=NOW))
    earlier = rec.recommend(RecommendationRequest("bob", top_k=6, as_of=150))
    assert "i5" not in ids(later.items) and "i5" in ids(earlier.items)
    assert (later.as_of, earlier.as_of) == (NOW, 150)
    history = rec._histories([RecommendationRequest("bob")], as_of=np.array([150]), deadline=float("inf"))
    assert len(history.histories[0]) == 0


def test_recent_items_default_to_as_of_and_later_ones_are_ignored(rec: TwoStageRecommender) -> None:
    request = RecommendationRequest(
        "carol", recent_items=(RecentItem("i2"), RecentItem("i3", 500), RecentItem("i4", 90)), as_of=300
    )
    got = rec._histories([request], as_of=np.array([300]), deadline=float("inf"))
    history = got.histories[0]
    assert history.item_idx.tolist() == [4, 2]  # i4 at 90, i2 at as_of; i3 at 500 is after as_of
    assert history.timestamps.tolist() == [90, 300]
    assert got.ignored == [1]
    # Events at or after the model's data end are counted on top of the artifact's (none are here).
    assert got.later == [1]  # i2 at 300 >= tiny.DATA_END


def test_the_clock_is_the_server_clock_unless_the_request_says(tiny_model_dir: Path) -> None:
    at_noon = TwoStageRecommender(load_artifact(tiny_model_dir), Settings(), clock=lambda: 43_200.0)
    assert at_noon.recommend(RecommendationRequest("alice")).as_of == 43_200
    assert at_noon.recommend(RecommendationRequest("alice", as_of=120)).as_of == 120


def test_item_time_features_are_computed_at_as_of(rec: TwoStageRecommender) -> None:
    # Every item's background ratings are at t=50: asked at t=40 no item has a rating yet.
    idx = np.arange(6)
    static = np.zeros((6, len(tiny.ITEM_FEATURES)), dtype=np.float32)
    before = rec._point_in_time.item_rows(static, idx, np.full(6, 40))
    after = rec._point_in_time.item_rows(static, idx, np.full(6, NOW))
    count = tiny.ITEM_FEATURES.index("item_rating_count")
    assert before[:, count].tolist() == [0] * 6
    assert after[:, count].tolist() == [100 - 10 * i for i in range(6)]


def test_answer_many_gives_each_request_its_own_error(rec: TwoStageRecommender) -> None:
    answers = rec.answer_many([RecommendationRequest("nobody", on_unknown_user="error"),
                               RecommendationRequest("alice", top_k=2)])
    assert isinstance(answers[0], UserNotFound) and len(answers[1].items) == 2
    with pytest.raises(UserNotFound):
        rec.recommend_many([RecommendationRequest("nobody", on_unknown_user="error")])


def test_json_lines_batches_on_threads_answer_as_one_thread_does(rec: TwoStageRecommender) -> None:
    from twostage_rec.handler import answer_lines
    from twostage_rec.request import RequestLine, decode_line

    users = ["alice", "bob", "carol", "zed"]
    raw = [f'{{"user_id": "{users[n % 4]}", "top_k": 3, "as_of": {150 + n}}}' for n in range(25)] + ["oops"]
    lines = [decode_line(n, text, 1e9) for n, text in enumerate(raw, start=1)]
    one = answer_lines(rec, lines, batch_size=4, threads=1)
    many = answer_lines(rec, lines, batch_size=4, threads=3)
    assert [a.items for a in one[:-1]] == [a.items for a in many[:-1]]  # type: ignore[union-attr]
    assert [a.user_id for a in many[:-1]] == [users[n % 4] for n in range(25)]  # type: ignore[union-attr]
    assert isinstance(many[-1], RequestLine) and many[-1].line == 26
