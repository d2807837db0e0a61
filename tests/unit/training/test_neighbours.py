"""Windowed co-occurrence neighbours, checked by hand on two short histories."""

from __future__ import annotations

import numpy as np
import pytest

from training.interactions import Encoded, Histories
from training.models.neighbours import NeighbourConfig, build_neighbours, cooccurrence, neighbours_from, top_neighbours


def histories(*sequences: list[int]) -> Histories:
    users = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    items = np.concatenate([np.array(s) for s in sequences])
    times = np.concatenate([np.arange(len(s)) for s in sequences])
    return Histories.of(Encoded(users, items, np.ones(len(items), np.float32), times), len(sequences))


def as_dict(lists, n_items: int) -> dict[int, dict[int, float]]:  # noqa: ANN001
    return {
        i: dict(
            zip(
                lists.items[lists.indptr[i] : lists.indptr[i + 1]].tolist(),
                lists.scores[lists.indptr[i] : lists.indptr[i + 1]].tolist(),
            )
        )
        for i in range(n_items)
    }


def test_window_one_counts_next_items_and_normalises_by_popularity() -> None:
    # A: 0 1 2, B: 0 1. Pairs one step apart: (0,1) twice, (1,2) once.
    config = NeighbourConfig(window=1, backward_weight=0.5, alpha=0.5, max_neighbours=10)
    got = as_dict(build_neighbours(histories([0, 1, 2], [0, 1]), 3, config), 3)
    # popularity 0:2, 1:2, 2:1; score = C / (n_a^0.5 n_b^0.5)
    assert got[0] == pytest.approx({1: 2 / 2})
    assert got[1] == pytest.approx({0: 1 / 2, 2: 1 / np.sqrt(2)})  # backward 0.5 x 2; forward 1
    assert got[2] == pytest.approx({1: 0.5 / np.sqrt(2)})
    assert list(got[1]) == [2, 0]  # best first


def test_wider_windows_decay_with_distance_and_never_cross_users_or_pair_an_item_with_itself() -> None:
    config = NeighbourConfig(window=2, distance_decay=0.5, backward_weight=0.0, alpha=0.0, max_neighbours=10)
    got = as_dict(build_neighbours(histories([0, 1, 2], [3, 3, 4]), 5, config), 5)
    # alpha 0: score = C / n_b. 0 -> 1 (1, 1 away), 0 -> 2 (0.5, 2 away); 2 never sees 3.
    assert got[0] == pytest.approx({1: 1.0, 2: 0.5})
    assert got[1] == pytest.approx({2: 1.0})
    assert got[2] == {}
    assert got[3] == pytest.approx({4: (1.0 + 0.5) / 1})  # the repeat 3 -> 3 is not a pair


def test_top_neighbours_keeps_the_best_per_row_with_ties_to_the_lower_item() -> None:
    lists = top_neighbours(np.array([0, 0, 0, 1]), np.array([3, 1, 2, 0]), np.array([0.5, 0.9, 0.5, -1.0]), 3, 2)
    got = as_dict(lists, 3)
    assert list(got[0]) == [1, 2] and got[1] == {} and got[2] == {}


def test_one_count_serves_every_alpha_as_a_fresh_build_would() -> None:
    h = histories([0, 1, 2, 3, 1], [2, 0, 1], [3, 2, 2, 0])
    counts = cooccurrence(h, 4, NeighbourConfig(window=3, backward_weight=0.25))
    for alpha in (0.0, 0.5, 0.9):
        config = NeighbourConfig(window=3, backward_weight=0.25, alpha=alpha, max_neighbours=2)
        fresh, reused = build_neighbours(h, 4, config), neighbours_from(counts, config)
        for part in ("indptr", "items", "scores"):
            np.testing.assert_array_equal(getattr(reused, part), getattr(fresh, part))
    # alpha changes the scores (else the check above would prove little)
    low = neighbours_from(counts, NeighbourConfig(window=3, backward_weight=0.25, alpha=0.0))
    high = neighbours_from(counts, NeighbourConfig(window=3, backward_weight=0.25, alpha=0.9))
    assert not np.array_equal(low.scores, high.scores)
