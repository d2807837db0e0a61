"""The replay evaluation's pieces on hand-checkable data (the whole replay runs in test_pipeline)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from training import replay
from training.datasets import Dataset
from twostage_rec import schema

DAY = 86_400
T0 = 1_000_000_000


def dataset(rows: list[tuple[str, str, int]]) -> Dataset:
    frame = pd.DataFrame(rows, columns=[schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP])
    for column in (schema.USER_ID, schema.ITEM_ID):
        frame[column] = pd.Categorical(frame[column], categories=sorted(set(frame[column])))
    frame[schema.RATING] = np.float32(4.0)
    frame[schema.TIMESTAMP] = frame[schema.TIMESTAMP].astype(np.int64)
    frame = frame[list(schema.INTERACTION_COLUMNS)].sort_values(schema.TIMESTAMP, kind="stable")
    items = pd.DataFrame({schema.ITEM_ID: sorted(set(frame[schema.ITEM_ID].astype(str)))})
    return Dataset("tiny", frame.reset_index(drop=True), items, schema.ITEM_ID, (1.0, 5.0))


ROWS = [
    ("a", "i1", T0), ("b", "i2", T0 + 1), ("a", "i2", T0 + 2), ("c", "i9", T0 + 3),  # before the cut-off
    ("b", "i3", T0 + 10 * DAY), ("a", "i4", T0 + 9 * DAY), ("a", "i5", T0 + 20 * DAY), ("d", "i1", T0 + 12 * DAY),
]


def test_cutoff_is_the_time_before_which_the_quantile_falls() -> None:
    assert replay.cutoff(dataset(ROWS), 0.5) == T0 + 9 * DAY  # 4 of the 8 rows are before it
    assert replay.cutoff(dataset(ROWS), 0.9) == T0 + 20 * DAY


def test_split_trains_on_the_past_and_groups_later_events_by_user_in_time_order() -> None:
    before, events = replay.split_at(dataset(ROWS), T0 + 5)
    assert len(before.interactions) == 4 and before.name == "tiny-before-replay"
    assert list(before.interactions[schema.ITEM_ID].cat.categories) == ["i1", "i2", "i9"]  # unused ones dropped
    assert events.user_ids.tolist() == ["a", "a", "b", "d"]
    assert events.item_ids.tolist() == ["i4", "i5", "i3", "i1"]
    assert events.position.tolist() == [0, 1, 0, 0] and events.start.tolist() == [0, 0, 2, 3]


def test_fresh_requests_carry_the_users_earlier_events_since_the_cutoff() -> None:
    _, events = replay.split_at(dataset(ROWS), T0 + 5)
    fresh = replay.replay_requests(events, np.arange(4), fresh=True)
    frozen = replay.replay_requests(events, np.arange(4), fresh=False)
    assert [r.as_of for r in fresh] == [T0 + 9 * DAY, T0 + 20 * DAY, T0 + 10 * DAY, T0 + 12 * DAY]
    assert [len(r.recent_items) for r in fresh] == [0, 1, 0, 0]
    assert fresh[1].recent_items[0].item_id == "i4" and fresh[1].recent_items[0].timestamp == T0 + 9 * DAY
    assert all(not r.recent_items for r in frozen) and [r.as_of for r in frozen] == [r.as_of for r in fresh]
    assert all(r.top_k == 10 and r.num_candidates == 100 for r in fresh)


def test_ndcg_of_a_top_10_and_the_weekly_summary() -> None:
    ranking = np.array([[5, 3, 7] + [-1] * 7, [1, 2, 3] + [-1] * 7, [4] * 10])
    np.testing.assert_allclose(replay._ndcg(ranking, np.array([3, 9, -1])), [1 / np.log2(3), 0.0, 0.0])
    _, events = replay.split_at(dataset(ROWS), T0 + 5)
    rows = np.arange(4)
    ndcg = {"two_stage_fresh": np.array([1.0, 0.5, 0.0, 0.0]), "two_stage_frozen": np.array([0.0, 0.5, 0.0, 0.0])}
    summary = replay.summarize(ndcg, events, rows, T0 + 5, np.array([True, True, True, False]))
    assert summary["models"]["two_stage_fresh"]["ndcg@10"] == 0.375
    assert summary["models"]["two_stage_fresh"]["hr@10"] == 0.5
    assert summary["fresh_minus_frozen"]["ndcg@10"] == 0.25
    weeks = {w["weeks"]: w for w in summary["by_week"]}
    assert set(weeks) == {"2", "3"} and weeks["2"]["events"] == 3  # days 9, 10 and 12; day 20 in week 3
    assert summary["unknown_item_share"] == 0.25
