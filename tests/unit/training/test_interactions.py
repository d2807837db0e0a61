"""Encoded rows and per-user histories on tables small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from training import interactions
from training.interactions import Encoded, Histories


def encoded(users: list[int], items: list[int], times: list[int]) -> Encoded:
    users_, items_, times_ = (np.array(values, dtype=np.int64) for values in (users, items, times))
    return Encoded(users_, items_, np.arange(len(users), dtype=np.float32), times_)


def test_histories_order_each_user_by_time_keeping_input_order_on_ties() -> None:
    h = Histories.of(encoded([1, 0, 1, 1, 0], [10, 20, 30, 40, 50], [5, 9, 3, 5, 1]), n_users=3)
    assert h.indptr.tolist() == [0, 2, 5, 5]
    assert h.items.tolist() == [50, 20, 30, 10, 40]  # user 1's tie at t=5: 10 came first in the input
    assert h.ratings.tolist() == [4, 1, 2, 0, 3]


def test_of_sorted_skips_the_sort_and_refuses_unsorted_rows() -> None:
    rows = encoded([0, 0, 1, 1, 1], [7, 8, 9, 7, 8], [1, 1, 0, 4, 4])
    got, want = Histories.of_sorted(rows, n_users=2), Histories.of(rows, n_users=2)
    for column in ("indptr", "items", "timestamps", "ratings"):
        np.testing.assert_array_equal(getattr(got, column), getattr(want, column))
    assert Histories.of_sorted(encoded([], [], []), n_users=1).indptr.tolist() == [0, 0]
    with pytest.raises(ValueError, match=r"not in \(user, time\) order"):
        Histories.of_sorted(encoded([0, 0], [1, 2], [5, 4]), n_users=1)
    with pytest.raises(ValueError, match=r"not in \(user, time\) order"):
        Histories.of_sorted(encoded([1, 0], [1, 2], [0, 9]), n_users=2)


@pytest.mark.parametrize("bad_row", range(1, 9))
def test_of_sorted_checks_every_chunk_edge(monkeypatch: pytest.MonkeyPatch, bad_row: int) -> None:
    monkeypatch.setattr(interactions, "_CHECK_CHUNK_ROWS", 3)  # chunks of 4 rows overlapping by one
    users, times = [0, 0, 0, 1, 1, 1, 2, 2, 2], [1, 2, 3, 1, 2, 3, 1, 2, 3]
    Histories.of_sorted(encoded(users, users, times), n_users=3)
    # Swapping two neighbours of a strictly (user, time)-increasing table puts one out of order.
    for column in (users, times):
        column[bad_row - 1], column[bad_row] = column[bad_row], column[bad_row - 1]
    with pytest.raises(ValueError, match=r"not in \(user, time\) order"):
        Histories.of_sorted(encoded(users, users, times), n_users=3)
