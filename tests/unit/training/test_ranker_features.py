"""Point-in-time ranker features: hand-checked values, an oracle, and the no-leakage property."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training import ranker_features as rf
from twostage_rec import schema

DAY = 86_400
T0 = 1_000_000_000


def interactions(rows: list[tuple[str, str, float, int]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(schema.INTERACTION_COLUMNS))
    return frame.astype({schema.RATING: "float64", schema.TIMESTAMP: "int64"})


HISTORY = interactions(
    [
        ("u1", "i1", 4.0, T0),
        ("u1", "i2", 2.0, T0 + DAY),
        ("u2", "i1", 5.0, T0 + 2 * DAY),
        ("u2", "i3", 3.0, T0 + 2 * DAY),
    ]
)
ITEMS = pd.DataFrame(
    {
        schema.ITEM_ID: ["i1", "i2", "i3"],
        schema.CATEGORY: ["Drama", None, "Action"],
        schema.PRICE: [9.5, np.nan, 3.0],
        schema.YEAR: [1999.0, 2001.0, np.nan],
    }
)
NAN = np.nan
N_ITEM = len(rf.ITEM_FEATURES)


def test_feature_orders_match_the_schema_names() -> None:
    assert rf.ITEM_FEATURES == (
        "item_avg_rating", "item_rating_count", "item_rating_count_30d", "item_rating_count_7d",
        "item_popularity_trend", "item_days_since_first", "category_code", "price", "year",
    )
    names = rf.ranker_feature_names(["mf", "sequence"])
    assert names[:5] == ("mf_score", "mf_rank", "sequence_score", "sequence_rank", "fusion_score")
    assert names[5 : 5 + len(schema.HISTORY_FEATURES)] == schema.HISTORY_FEATURES
    assert names[-len(rf.ITEM_FEATURES):] == rf.ITEM_FEATURES
    assert not set(schema.HISTORY_FEATURES) & set(rf.ranker_feature_names(["mf"], history_features=False))


def test_category_vocabulary_is_sorted_unique_non_null() -> None:
    assert rf.category_vocabulary(ITEMS) == ["Action", "Drama"]
    assert rf.category_vocabulary(ITEMS.drop(columns=schema.CATEGORY)) == []


def test_user_features_by_hand() -> None:
    users = ["u1", "u1", "u1", "u2", "u2", "stranger"]
    times = np.array([T0, T0 + 1, T0 + DAY + 1, T0 + 2 * DAY, T0 + 9 * DAY, T0 + 9 * DAY])
    got = rf.point_in_time_user_features(HISTORY, users, times)
    expected = [[NAN, 0], [4, 1], [3, 2], [NAN, 0], [4, 2], [NAN, 0]]
    np.testing.assert_array_equal(got, np.array(expected, dtype=np.float32))
    assert got.dtype == np.float32


def test_item_features_by_hand() -> None:
    vocabulary = rf.category_vocabulary(ITEMS)  # Action=0, Drama=1
    items = ["i1", "i1", "i1", "i3", "i2", "unlisted"]
    times = np.array([T0, T0 + 2 * DAY, T0 + 2 * DAY + 1, T0 + 3 * DAY, T0 + DAY + 1, T0])
    got = rf.point_in_time_item_features(HISTORY, ITEMS, items, times, vocabulary)
    expected = [
        # avg, count, count in the last 30 and 7 days, trend (daily rate of 7 over 30 days),
        # days since first, category code, price, year
        [NAN, 0, 0, 0, NAN, NAN, 1, 9.5, 1999],  # same second as the first rating: excluded
        [4.0, 1, 1, 1, 30 / 7, 2.0, 1, 9.5, 1999],  # u2's rating at exactly this second: excluded
        [4.5, 2, 2, 2, 30 / 7, 2 + 1 / DAY, 1, 9.5, 1999],
        [3.0, 1, 1, 1, 30 / 7, 1.0, 0, 3.0, NAN],
        [2.0, 1, 1, 1, 30 / 7, 1 / DAY, NAN, NAN, 2001],  # null category -> NaN code
        [NAN, 0, 0, 0, NAN, NAN, NAN, NAN, NAN],  # neither rated nor in the metadata table
    ]
    np.testing.assert_allclose(got, np.array(expected, dtype=np.float32), rtol=1e-6)


def test_category_missing_from_the_vocabulary_is_nan() -> None:
    got = rf.point_in_time_item_features(HISTORY, ITEMS, ["i3", "i1"], T0, ["Drama"])
    np.testing.assert_array_equal(got[:, rf.ITEM_FEATURES.index(schema.CATEGORY_CODE)], [NAN, 0.0])


def test_index_features_at_data_end_count_all_history_like_the_frame_api() -> None:
    # The pipeline's path: integer indices, serving's PointInTimeFeatures, static rows by item_idx.
    user_ids, item_ids = ["u2", "u1", "u0"], ["i3", "i2", "i1"]
    user_idx = HISTORY[schema.USER_ID].map({u: k for k, u in enumerate(user_ids)}).to_numpy()
    item_idx = HISTORY[schema.ITEM_ID].map({i: k for k, i in enumerate(item_ids)}).to_numpy()
    times, ratings = HISTORY[schema.TIMESTAMP].to_numpy(), HISTORY[schema.RATING].to_numpy()
    data_end = int(times.max()) + 1
    features = rf.PointInTimeFeatures(
        rf.Timeline.build(user_idx, times, ratings, 3),
        rf.Timeline.build(item_idx, times, ratings, 3),
        data_end,
        rf.USER_FEATURES,
        rf.ITEM_FEATURES,
    )
    users = features.user_rows(np.arange(3), np.full(3, data_end))
    np.testing.assert_array_equal(users, np.array([[4, 2], [3, 2], [NAN, 0]], dtype=np.float32))
    static = rf.item_static_rows(ITEMS, item_ids, ["Action", "Drama"])
    assert np.isnan(static[:, : len(rf.ITEM_FEATURES) - 3]).all()
    items = features.item_rows(static, np.arange(3), np.full(3, data_end))
    assert items.shape == (3, len(rf.ITEM_FEATURES)) and items.dtype == np.float32
    expected = rf.point_in_time_item_features(HISTORY, ITEMS, item_ids, data_end, ["Action", "Drama"])
    np.testing.assert_array_equal(items, expected)
    by_pandas = HISTORY.groupby(schema.ITEM_ID)[schema.RATING].agg(["mean", "count"])
    np.testing.assert_allclose(items[:, :2], by_pandas.loc[item_ids].to_numpy(), rtol=1e-6)


def test_after_data_end_item_statistics_stay_those_at_data_end() -> None:
    # A model asked after its data ends answers with its newest statistics: the 30- and 7-day
    # counts do not fall to zero, and an item's age stops at data_end.
    times, ratings = HISTORY[schema.TIMESTAMP].to_numpy(), HISTORY[schema.RATING].to_numpy()
    item_idx = HISTORY[schema.ITEM_ID].map({"i1": 0, "i2": 1, "i3": 2}).to_numpy()
    timeline = rf.Timeline.build(item_idx, times, ratings, 3)
    data_end = int(times.max()) + 1
    from twostage_rec.timelines import item_statistics

    at_end = item_statistics(timeline, np.arange(3), np.full(3, data_end), data_end)
    years_later = item_statistics(timeline, np.arange(3), np.full(3, data_end + 900 * DAY), data_end)
    np.testing.assert_array_equal(years_later, at_end)
    assert at_end[0, 2] == 2  # i1's two ratings are within 30 days of data_end
    earlier = item_statistics(timeline, np.arange(3), np.full(3, T0 + DAY + 1), data_end)
    np.testing.assert_array_equal(earlier[:, 1], [1, 1, 0])  # before data_end, the moment asked for


def test_empty_history_or_items_give_nan() -> None:
    got = rf.point_in_time_item_features(HISTORY.iloc[:0], ITEMS, ["i1"], T0, ["Drama"])
    np.testing.assert_array_equal(got, np.array([[NAN, 0, 0, 0, NAN, NAN, 0, 9.5, 1999]], dtype=np.float32))
    no_items = rf.point_in_time_item_features(HISTORY, ITEMS.iloc[:0], ["i1"], T0 + DAY, [])
    np.testing.assert_allclose(no_items, np.array([[4, 1, 1, 1, 30 / 7, 1, NAN, NAN, NAN]], dtype=np.float32))


def test_recent_count_only_counts_the_30_days_before() -> None:
    history = pd.DataFrame(
        {
            schema.USER_ID: ["a", "b", "c"],
            schema.ITEM_ID: ["i1", "i1", "i1"],
            schema.RATING: np.array([5.0, 4.0, 3.0], dtype=np.float32),
            schema.TIMESTAMP: np.array([T0, T0 + 40 * DAY, T0 + 45 * DAY], dtype=np.int64),
        }
    )
    got = rf.point_in_time_item_features(history, ITEMS, ["i1", "i1"], np.array([T0 + 50 * DAY, T0 + 80 * DAY]), [])
    np.testing.assert_array_equal(got[:, 1:4], [[3, 2, 1], [3, 0, 0]])  # all, 30 days, 7 days
    np.testing.assert_allclose(got[0, 4], (1 / 7) / (2 / 30))
    assert np.isnan(got[1, 4])  # nothing in the last 30 days: no trend


# --- oracle and no-leakage property over random small frames -------------------------------

USERS = ["u0", "u1", "u2"]
ITEM_IDS = ["i0", "i1", "i2", "i3"]
RANDOM_ITEMS = pd.DataFrame(
    {
        schema.ITEM_ID: ITEM_IDS,
        schema.CATEGORY: ["b", "a", None, "b"],
        schema.PRICE: [1.0, 2.5, np.nan, 4.0],
        schema.YEAR: [1990.0, np.nan, 2000.0, 2010.0],
    }
)
# Few timestamps so that ties (same second) are common; half-star ratings sum exactly.
row_strategy = st.tuples(
    st.sampled_from(USERS), st.sampled_from(ITEM_IDS),
    st.sampled_from([1.0, 1.5, 2.0, 3.0, 4.5, 5.0]), st.integers(0, 12),
)
query_strategy = st.tuples(
    st.sampled_from([*USERS, "u_new"]), st.sampled_from([*ITEM_IDS, "i_new"]), st.integers(-1, 14)
)
PROPERTY = settings(max_examples=60, derandomize=True, database=None, deadline=None)


def features(history: pd.DataFrame, queries: list[tuple[str, str, int]]) -> np.ndarray:
    users, items, times = (list(column) for column in zip(*queries))
    times = np.array(times, dtype=np.int64)
    user = rf.point_in_time_user_features(history, users, times)
    vocabulary = rf.category_vocabulary(RANDOM_ITEMS)
    item = rf.point_in_time_item_features(history, RANDOM_ITEMS, items, times, vocabulary)
    return np.hstack([user, item])


def oracle(history: pd.DataFrame, queries: list[tuple[str, str, int]]) -> np.ndarray:
    """The definition, one query at a time."""
    meta = RANDOM_ITEMS.set_index(schema.ITEM_ID)
    vocabulary = rf.category_vocabulary(RANDOM_ITEMS)
    rows = []
    for user_id, item_id, t in queries:
        before = history[history[schema.TIMESTAMP] < t]
        by_user = before[before[schema.USER_ID] == user_id][schema.RATING]
        by_item = before[before[schema.ITEM_ID] == item_id]
        recent = int((by_item[schema.TIMESTAMP] >= t - rf.RECENT_WINDOW_S).sum())
        week = int((by_item[schema.TIMESTAMP] >= t - rf.WEEK_WINDOW_S).sum())
        trend = (week / 7) / (recent / 30) if recent else NAN
        first = by_item[schema.TIMESTAMP].min() if len(by_item) else NAN
        if item_id in meta.index:
            category = meta.at[item_id, schema.CATEGORY]
            code = vocabulary.index(category) if isinstance(category, str) else NAN
            static = [code, meta.at[item_id, schema.PRICE], meta.at[item_id, schema.YEAR]]
        else:
            static = [NAN, NAN, NAN]
        rows.append(
            [
                by_user.mean() if len(by_user) else NAN, len(by_user),
                by_item[schema.RATING].mean() if len(by_item) else NAN, len(by_item), recent, week, trend,
                (t - first) / DAY, *static,
            ]
        )
    return np.array(rows, dtype=np.float32)


@PROPERTY
@given(st.lists(row_strategy, max_size=25), st.lists(query_strategy, min_size=1, max_size=8))
def test_features_match_the_one_query_at_a_time_definition(rows, queries) -> None:
    history = interactions(rows)
    np.testing.assert_allclose(features(history, queries), oracle(history, queries), rtol=1e-6)


@PROPERTY
@given(st.lists(row_strategy, max_size=25), st.lists(query_strategy, min_size=1, max_size=8))
def test_categorical_ids_read_as_their_codes_give_the_same_features(rows, queries) -> None:
    # The loaders' id columns are categoricals; one category no row uses is an entity without rows.
    history = interactions(rows)
    coded = history.astype(
        {col: pd.CategoricalDtype(["unused", *sorted(set(history[col]))]) for col in (schema.USER_ID, schema.ITEM_ID)}
    )
    np.testing.assert_allclose(features(coded, queries), oracle(history, queries), rtol=1e-6)


@PROPERTY
@given(
    st.lists(row_strategy, max_size=25),
    st.lists(query_strategy, min_size=1, max_size=8),
    st.lists(row_strategy, min_size=1, max_size=10),
    st.randoms(use_true_random=False),
)
def test_future_rows_never_change_earlier_features(rows, queries, extra, random) -> None:
    history = interactions(rows)
    before = features(history, queries)

    # Rows at or after every query time (equal times included), history order shuffled:
    # nothing may change, bit for bit.
    latest = max(t for _, _, t in queries)
    future = [(u, i, r, latest + offset) for u, i, r, offset in extra]
    combined = interactions(rows + future)
    combined = combined.iloc[random.sample(range(len(combined)), len(combined))]
    np.testing.assert_array_equal(features(combined, queries), before)

    # Rows at arbitrary times: a query's user (item) features may change only if a new row of
    # that user (item) is strictly before the query time.
    after = features(interactions(rows + extra), queries)
    n_user = len(rf.USER_FEATURES)
    for q, (user_id, item_id, t) in enumerate(queries):
        if not any(u == user_id and ts < t for u, _, _, ts in extra):
            np.testing.assert_array_equal(after[q, :n_user], before[q, :n_user])
        if not any(i == item_id and ts < t for _, i, _, ts in extra):
            np.testing.assert_array_equal(after[q, n_user:], before[q, n_user:])


# --- the ranker matrix and input errors ------------------------------------------------------


def test_bad_inputs_get_one_line_messages() -> None:
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rating'\]"):
        rf.point_in_time_user_features(HISTORY.drop(columns=schema.RATING), ["u1"], T0)
    with pytest.raises(ValueError, match="'timestamp' must hold integer seconds"):
        rf.point_in_time_user_features(HISTORY.astype({schema.TIMESTAMP: float}), ["u1"], T0)
    nan_rating = HISTORY.assign(**{schema.RATING: [4.0, NAN, 5.0, 3.0]})
    with pytest.raises(ValueError, match="'rating' is empty at row 1"):
        rf.point_in_time_user_features(nan_rating, ["u1"], T0)
    with pytest.raises(ValueError, match=r"at_time has shape \(2,\), expected \(1,\)"):
        rf.point_in_time_user_features(HISTORY, ["u1"], np.array([T0, T0]))
    with pytest.raises(ValueError, match="at_time must hold integer seconds"):
        rf.point_in_time_user_features(HISTORY, ["u1"], np.array([1.5]))
    with pytest.raises(ValueError, match="'item_id' repeats id 'i1'"):
        rf.point_in_time_item_features(HISTORY, pd.concat([ITEMS, ITEMS]), ["i1"], T0, [])
    with pytest.raises(ValueError, match="'price' must be numeric"):
        rf.point_in_time_item_features(HISTORY, ITEMS.assign(price="$3"), ["i1"], T0, [])
