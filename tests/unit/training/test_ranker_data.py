"""The ranker's rows: features built in chunks of queries equal one build over every query."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support import tiny_model as tiny
from training import ranker_data
from training.evaluation import SourceRun
from twostage_rec import schema
from twostage_rec.artifact import load_artifact
from twostage_rec.history import UserHistory
from twostage_rec.settings import Settings
from twostage_rec.sources import Query, neighbours
from twostage_rec.sources.assembly import make_merger, make_sources

NAMES = tiny.CANDIDATE_NAMES


def test_chunked_features_equal_one_build_of_every_query(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    artifact = load_artifact(tiny_model_dir)
    builder = tiny.feature_builder(artifact)
    histories = [[2, 0], [1], [], [3, 4, 5, 0], [0, 1, 2], [5]]
    queries = [
        Query(
            u % 3 if items else -1,
            UserHistory(np.array(items, np.int64), 100 * np.arange(1, len(items) + 1)),
            np.array(items, np.int64),
            None,
            4,
        )
        for u, items in enumerate(histories)
    ]
    sources = make_sources(artifact, Settings())
    run = SourceRun(queries, {s.name: s.run(queries) for s in sources})
    merged = run.merged(make_merger(artifact))
    lengths = np.array([len(m.item_idx) for m in merged], dtype=np.int64)
    at_time = [1_000 + 3_600 * q for q in range(len(queries))]
    rng = np.random.default_rng(0)
    user_rows = rng.normal(size=(len(queries), len(tiny.USER_FEATURES))).astype(np.float32)
    item_rows = rng.normal(size=(int(lengths.sum()), len(tiny.ITEM_FEATURES))).astype(np.float32)

    # The whole batch through the sorted (sparse) neighbour sums, as one build of a large period did;
    # chunks of two queries through the dense ones.
    monkeypatch.setattr(neighbours, "DENSE_KEYS", 0)
    whole = builder.matrix(queries, merged, at_time, user_rows, item_rows)
    monkeypatch.setattr(neighbours, "DENSE_KEYS", 1 << 22)
    monkeypatch.setattr(ranker_data, "FEATURE_CHUNK", 2)
    chunked = ranker_data._feature_matrix(builder, run, merged, at_time, user_rows, item_rows, lengths)

    assert len(whole) == lengths.sum() and np.isfinite(whole[:, NAMES.index(schema.COOC_LAST_1)]).any()
    np.testing.assert_array_equal(chunked, whole)
