"""Temporal leave-last-out on tiny tables, including same-second ties and short histories."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.indexing import index_and_encode
from training.interactions import Encoded, Histories
from training import split as split_module
from training.split import HoldOut, Split, hold_out, leave_last_out, tie_hash
from twostage_rec import schema


def table(rows: list[tuple[str, str, float, int]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(schema.INTERACTION_COLUMNS))
    return frame.astype({schema.RATING: "float32", schema.TIMESTAMP: "int64"})


def triples(frame: pd.DataFrame) -> list[tuple[str, str, int]]:
    return list(zip(frame[schema.USER_ID], frame[schema.ITEM_ID], frame[schema.TIMESTAMP], strict=True))


def test_last_is_test_one_before_is_validation_short_users_stay_in_train() -> None:
    split = leave_last_out(
        table(
            [
                ("b", "x", 1.0, 5),
                ("a", "i3", 3.0, 30),
                ("a", "i1", 1.0, 10),
                ("c", "y", 2.0, 7),
                ("a", "i4", 4.0, 40),
                ("b", "z", 1.0, 6),
                ("a", "i2", 2.0, 20),
            ]
        )
    )
    assert triples(split.train) == [("a", "i1", 10), ("a", "i2", 20), ("b", "x", 5), ("b", "z", 6), ("c", "y", 7)]
    assert triples(split.validation) == [("a", "i3", 30)]
    assert triples(split.test) == [("a", "i4", 40)]
    for frame in (split.train, split.validation, split.test):
        assert list(frame.columns) == list(schema.INTERACTION_COLUMNS)
        assert frame.index.equals(pd.RangeIndex(len(frame)))
    assert split.test[schema.RATING].tolist() == [4.0]


def test_exactly_three_interactions_hold_out_two() -> None:
    split = leave_last_out(table([("u", "a", 1, 1), ("u", "b", 1, 2), ("u", "c", 1, 3)]))
    assert (len(split.train), len(split.validation), len(split.test)) == (1, 1, 1)


def test_ties_split_the_same_way_whatever_the_row_order() -> None:
    # Three items in the user's last second: which is test must not depend on file order.
    rows = [("u", "early", 5.0, 1), ("u", "p", 4.0, 9), ("u", "q", 3.0, 9), ("u", "r", 2.0, 9)]
    reference = leave_last_out(table(rows))
    assert triples(reference.train)[0] == ("u", "early", 1)
    held_out = {*reference.validation[schema.ITEM_ID], *reference.test[schema.ITEM_ID]}
    assert held_out < {"p", "q", "r"} and len(held_out) == 2
    for permutation in ([3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]):
        again = leave_last_out(table([rows[i] for i in permutation]))
        for part in ("train", "validation", "test"):
            pd.testing.assert_frame_equal(getattr(again, part), getattr(reference, part))


def test_tie_break_does_not_follow_item_id_order() -> None:
    # 2000 users, each with one early item and two items tied in the last second. An id-ordered
    # tie-break would always hold out the larger id; a hash picks it about half the time.
    rng = np.random.default_rng(0)
    rows = []
    for user in range(2000):
        low, high = sorted(rng.choice(10_000, size=2, replace=False))
        rows.append((f"u{user}", "first", 3.0, 0))
        rows += [(f"u{user}", f"i{item:05d}", 3.0, 100) for item in (low, high)]
    split = leave_last_out(table(rows))
    test = split.test.set_index(schema.USER_ID)[schema.ITEM_ID]
    validation = split.validation.set_index(schema.USER_ID)[schema.ITEM_ID].reindex(test.index)
    share_max = float((test > validation).mean())
    assert 0.45 < share_max < 0.55  # binomial sd ~0.011: ~4.5 sd either way


def test_every_row_lands_in_exactly_one_part() -> None:
    rng = np.random.default_rng(1)
    n = 500
    frame = table(
        [
            (f"u{u}", f"i{i}", 3.0, int(t))
            for u, i, t in zip(rng.integers(0, 60, n), rng.permutation(n), rng.integers(0, 50, n), strict=True)
        ]
    )
    split = leave_last_out(frame)
    parts = pd.concat([split.train, split.validation, split.test])
    assert sorted(triples(parts)) == sorted(triples(frame))
    assert split.test[schema.USER_ID].is_unique
    assert set(split.test[schema.USER_ID]) == set(split.validation[schema.USER_ID])
    latest_train = split.train.groupby(schema.USER_ID)[schema.TIMESTAMP].max()
    validation = split.validation.set_index(schema.USER_ID)[schema.TIMESTAMP]
    test = split.test.set_index(schema.USER_ID)[schema.TIMESTAMP]
    assert (latest_train.reindex(validation.index) <= validation).all()
    assert (validation <= test.reindex(validation.index)).all()


def test_extra_columns_travel_and_empty_input_works() -> None:
    frame = table([("u", "a", 1, 1), ("u", "b", 1, 2), ("u", "c", 1, 3)]).assign(weight=[0.1, 0.2, 0.3])
    assert leave_last_out(frame).test["weight"].tolist() == [0.3]
    empty = leave_last_out(table([]))
    assert isinstance(empty, Split) and len(empty.train) == len(empty.validation) == len(empty.test) == 0


def test_missing_column_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="lack column 'timestamp'"):
        leave_last_out(pd.DataFrame({schema.USER_ID: ["u"], schema.ITEM_ID: ["i"]}))


def test_the_integer_split_gives_leave_last_out_rows_and_sorted_histories() -> None:
    # The pipeline's path: ids encoded once, hold_out on the codes, histories without a sort.
    rng = np.random.default_rng(2)
    n = 3000
    frame = table(
        [
            (f"u{u}", f"i{i}", float(r), int(t))
            for u, i, r, t in zip(
                rng.integers(0, 400, n),
                rng.integers(0, 90, n),
                rng.integers(1, 6, n),
                rng.integers(0, 30, n),
                strict=True,
            )
        ]
    )  # ~7 rows a user over 30 seconds: many same-second ties, some users with 1 or 2 rows
    users, user_idx = index_and_encode(frame[schema.USER_ID])
    items, item_idx = index_and_encode(frame[schema.ITEM_ID])
    encoded = Encoded(user_idx, item_idx, frame[schema.RATING].to_numpy(np.float32), frame[schema.TIMESTAMP].to_numpy())
    ties = tie_hash(
        pd.DataFrame({schema.USER_ID: users.categorical(user_idx), schema.ITEM_ID: items.categorical(item_idx)})
    )
    np.testing.assert_array_equal(ties, tie_hash(frame))  # categories hash as their values
    split = hold_out(encoded.user_idx, encoded.timestamp, ties)
    reference = leave_last_out(frame)
    parts = {}
    for name, part in (("train", HoldOut.TRAIN), ("validation", HoldOut.VALIDATION), ("test", HoldOut.TEST)):
        parts[name] = got = encoded.take(split.rows(part))
        want = Encoded.of(getattr(reference, name), users, items)
        for column in ("user_idx", "item_idx", "rating", "timestamp"):
            np.testing.assert_array_equal(getattr(got, column), getattr(want, column))
    assert len(parts["test"]) > 300 and (np.bincount(encoded.user_idx) < 3).any()
    train_val = parts["train"].concat(parts["validation"])
    for last, rows in (
        (HoldOut.TRAIN, parts["train"]),
        (HoldOut.VALIDATION, train_val),
        (HoldOut.TEST, train_val.concat(parts["test"])),
    ):
        got = Histories.of_sorted(encoded.take(split.order[split.part <= last]), len(users))
        want = Histories.of(rows, len(users))
        for column in ("indptr", "items", "timestamps", "ratings"):
            np.testing.assert_array_equal(getattr(got, column), getattr(want, column))


# One combined (user, time) key; the 3-key fallback where it would overflow or times are not integers.
@pytest.mark.parametrize(("span", "dtype"), [(30, np.int64), (2**61, np.int64), (30, np.float64)])
def test_hold_out_orders_by_user_then_time_then_tie(span: int, dtype: type) -> None:
    rng = np.random.default_rng(4)
    users = rng.integers(0, 5, 200)
    times = rng.integers(0, 4, 200) * (span // 4)
    if dtype is np.float64:  # fractional seconds order rows too
        times = times + rng.choice([0.25, 0.5], 200)
    ties = rng.integers(0, 2**63, 200).astype(np.uint64)
    split = hold_out(users, times, ties)
    np.testing.assert_array_equal(split.order, np.lexsort((ties, times, users)))
    assert (np.bincount(split.part) == [200 - 10, 5, 5]).all()


@pytest.mark.parametrize("block_rows", [7, 64, 10_000])
def test_hold_out_in_blocks_of_users_is_one_lexsort(monkeypatch: pytest.MonkeyPatch, block_rows: int) -> None:
    # Blocks of a few rows: users straddle block edges, one user outweighs a block, ties everywhere.
    monkeypatch.setattr(split_module, "SORT_BLOCK_ROWS", block_rows)
    rng = np.random.default_rng(5)
    users = np.concatenate([rng.integers(0, 40, 600), np.full(50, 17)])
    times = rng.integers(0, 6, len(users))
    ties = rng.integers(0, 3, len(users)).astype(np.uint64)  # equal ties too: input order decides
    split = hold_out(users, times, ties)
    np.testing.assert_array_equal(split.order, np.lexsort((ties, times, users)))
