"""Point-in-time statistics (twostage_rec.timelines): against a one-query-at-a-time definition."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from twostage_rec.timelines import (
    RECENT_WINDOW_S,
    WEEK_WINDOW_S,
    Timeline,
    item_statistics,
    running_sums,
    user_statistics,
)

DAY = 86_400
PROPERTY = settings(max_examples=80, derandomize=True, database=None, deadline=None)
rows = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40 * DAY), st.sampled_from([1.0, 2.5, 4.0, 5.0])),
                max_size=40)
queries = st.lists(st.tuples(st.integers(-1, 3), st.integers(-DAY, 45 * DAY)), min_size=1, max_size=12)


def timeline_of(data: list[tuple[int, int, float]], n: int = 4) -> Timeline:
    entity, times, ratings = (np.array(c) for c in zip(*data)) if data else (np.empty(0, int),) * 3
    return Timeline.build(entity.astype(np.int64), times.astype(np.int64), ratings.astype(np.float64), n)


@PROPERTY
@given(rows, queries, st.booleans())
def test_end_before_and_before_match_the_definition(data, asked, inclusive) -> None:
    timeline = timeline_of(data)
    idx = np.array([max(e, 0) for e, _ in asked])
    at = np.array([t for _, t in asked])
    stop = timeline.end_before(idx, at, inclusive=inclusive)
    count, rating_sum, first = timeline.before(np.array([e for e, _ in asked]), at)
    for q, (entity, t) in enumerate(asked):
        mine = sorted((ts, r) for e, ts, r in data if e == max(entity, 0))
        kept = [r for ts, r in mine if (ts <= t if inclusive else ts < t)]
        assert stop[q] - timeline.indptr[max(entity, 0)] == len(kept)
        strict = [(ts, r) for e, ts, r in data if e == entity and ts < t]
        assert count[q] == len(strict)
        if strict:
            assert rating_sum[q] == sum(r for _, r in strict) and first[q] == min(ts for ts, _ in strict)
        else:
            assert np.isnan(rating_sum[q]) and np.isnan(first[q])


@PROPERTY
@given(rows, queries, st.integers(0, 50 * DAY))
def test_item_statistics_are_taken_at_the_earlier_of_as_of_and_data_end(data, asked, data_end) -> None:
    timeline = timeline_of(data)
    idx = np.array([max(e, 0) for e, _ in asked])
    got = item_statistics(timeline, idx, np.array([t for _, t in asked]), data_end)
    for q, (entity, t) in enumerate(asked):
        at = min(t, data_end)
        before = [(ts, r) for e, ts, r in data if e == max(entity, 0) and ts < at]
        recent = sum(ts >= at - RECENT_WINDOW_S for ts, _ in before)
        week = sum(ts >= at - WEEK_WINDOW_S for ts, _ in before)
        expected = [
            np.mean([r for _, r in before]) if before else np.nan,
            len(before),
            recent,
            week,
            (week / 7) / (recent / 30) if recent else np.nan,
            (at - min(ts for ts, _ in before)) / DAY if before else np.nan,
        ]
        np.testing.assert_allclose(got[q], np.array(expected, dtype=np.float32), rtol=1e-6)


def test_user_statistics_add_the_events_the_artifact_does_not_hold() -> None:
    timeline = timeline_of([(0, 10, 4.0), (0, 20, 2.0), (1, 5, 5.0)], n=2)
    got = user_statistics(timeline, np.array([0, 0, 1, -1]), np.array([15, 30, 30, 30]), np.array([0, 3, 0, 2]))
    np.testing.assert_array_equal(got, np.array([[4, 1], [3, 5], [5, 1], [np.nan, 2]], dtype=np.float32))


def test_running_sums_restart_at_each_row() -> None:
    np.testing.assert_array_equal(
        running_sums(np.array([0, 2, 2, 5]), np.array([1.0, 2.0, 3.0, 4.0, 5.0])), [1.0, 3.0, 3.0, 7.0, 12.0]
    )


def test_an_empty_timeline_counts_nothing() -> None:
    timeline = timeline_of([], n=3)
    count, rating_sum, first = timeline.before(np.array([0, 2, -1]), np.array([5, 5, 5]))
    np.testing.assert_array_equal(count, [0, 0, 0])
    assert np.isnan(rating_sum).all() and np.isnan(first).all()
