"""The whole training run on a small synthetic dataset, through the CLI, into a servable artifact."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from training.__main__ import main
from twostage_rec import allocator
from twostage_rec.artifact import load_artifact
from twostage_rec.recommender import TwoStageRecommender
from twostage_rec.settings import Settings


@pytest.fixture(scope="module", autouse=True)
def allocator_calls() -> Iterator[list[str]]:
    """``run`` keeps freed memory for the rest of its process: here that process is pytest's, whose
    other tests measure memory. Record the calls instead."""
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(allocator, "keep_freed_memory", lambda: calls.append("keep") or True)
        yield calls


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    argv = ["run", "--dataset", "synthetic", "--n-users", "300", "--n-items", "400", "--epochs", "4",
            "--sequence-epochs", "3", "--dim", "16", "--evaluation-users", "200", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return out


def test_writes_model_tarball_and_metrics(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for model in ("popularity", "mf", "ease", "item_knn_recent", "sasrec", "svd", "two_stage"):
        assert set(metrics[model]) >= {"hr@10", "ndcg@10", "recall@100", "coverage@10", "ndcg@10_se"}, model
        assert 0.0 <= metrics[model]["ndcg@10"] <= metrics[model]["hr@10"] <= metrics[model]["recall@100"] <= 1.0
    assert metrics["dataset"] == "synthetic"
    # Validation and test on a seeded sample of 200 of the users that have both.
    assert metrics["n_test_users"] == 200 < metrics["n_evaluable_users"]
    assert set(metrics["stage1"]["recall@100"]) == {"mf", "item_neighbours", "sequence", "merged"}
    assert set(metrics["ablations"]) == {"without_mf", "without_item_neighbours", "without_sequence",
                                         "without_history_features", "without_item_time_statistics"}
    assert metrics["ranker"]["objective"] in metrics["tuning"]["ranker_objective"]
    assert set(metrics["two_stage_vs"]) == {"popularity", "mf", "ease", "item_knn_recent", "sasrec", "svd"}
    assert metrics["ranker"]["training_queries"] > metrics["n_test_users"]  # several positions per user
    assert (run_dir / "model.tar.gz").stat().st_size > 0
    # The two-stage numbers are the serving recommender's, which computes training's rows exactly.
    for period in ("validation", "test"):
        found = metrics["parity"][period]
        assert found["same_candidates"] == found["same_features"] == found["same_top10"] == found["queries"] > 0
    assert set(metrics["by_gap"]) == {"< 1 hour", "1 hour to 1 day", "1 to 30 days", "over 30 days"}
    for bucket in metrics["by_gap"].values():
        if bucket["users"]:  # the paired difference's mean is the difference of the means
            diff = bucket["two_stage_minus_best_source"]
            means = {m: v["ndcg@10"] for m, v in bucket.items() if m not in ("users", "two_stage_minus_best_source")}
            assert diff["source"] == max((m for m in means if m != "two_stage"), key=means.__getitem__)
            assert diff["ndcg@10"] == pytest.approx(means["two_stage"] - means[diff["source"]], abs=1e-12)
    assert metrics["two_stage_asked_90_days_later"]["ndcg@10"] >= 0.0
    replay = metrics["replay"]
    assert replay["events_scored"] > 0 and {"two_stage_fresh", "two_stage_frozen", "popularity"} <= set(replay["models"])
    assert replay["by_week"] and (run_dir / "replay" / "model" / "model_manifest.json").is_file()
    assert (run_dir / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sample = (run_dir / "ranker_sample.csv").read_text().splitlines()
    assert sample[0].startswith("user_id,item_id,as_of,label,mf_score") and len(sample) > 100
    artifact = load_artifact(run_dir / "model", verify_checksums=True)
    assert artifact.manifest.n_users == 300
    assert artifact.sequence_graph is not None and artifact.manifest.user_history is not None
    assert set(artifact.manifest.sources) == {"mf", "item_neighbours", "sequence", "fusion"}


def test_artifact_seen_mask_covers_every_interaction(run_dir: Path) -> None:
    from training.datasets import generate_synthetic

    data = generate_synthetic(n_users=300, n_items=400, seed=0).interactions
    artifact = load_artifact(run_dir / "model")
    users = {u: i for i, u in enumerate(artifact.user_ids)}
    items = {u: i for i, u in enumerate(artifact.item_ids)}
    seen = {
        (u, int(i))
        for u in range(artifact.manifest.n_users)
        for i in artifact.seen_indices[artifact.seen_indptr[u] : artifact.seen_indptr[u + 1]]
    }
    assert {(users[u], items[i]) for u, i in zip(data["user_id"], data["item_id"])} == seen


def test_recommend_command_matches_the_serving_recommender(run_dir: Path, tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text("u0\nu1\nnobody\n")
    out = tmp_path / "recs.jsonl"
    argv = ["recommend", "--model", str(run_dir / "model"), "--users", str(users), "--k", "5", "--out", str(out)]
    assert main(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["user_id"] for line in lines] == ["u0", "u1", "nobody"]
    rec = TwoStageRecommender(load_artifact(run_dir / "model"), Settings())
    from twostage_rec.recommender import get_recommendations

    assert lines[0]["items"] == [i["item_id"] for i in get_recommendations("u0", rec, top_k=5)]
    assert all(len(line["items"]) == 5 for line in lines)


def test_recommend_requests_answers_each_line_as_invocations_does(run_dir: Path, tmp_path: Path) -> None:
    from twostage_rec.request import RecommendationRequest

    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        '{"user_id": "u0", "top_k": 4, "as_of": 1700000000}\n'
        "{oops\n"
        '{"user_id": "nobody", "on_unknown_user": "error"}\n'
        '{"user_id": "u1", "top_k": 3, "as_of": "2023-11-14T22:13:20Z", "recent_items": ["i3"]}\n'
    )
    out = tmp_path / "answers.jsonl"
    assert main(["recommend", "--model", str(run_dir / "model"), "--requests", str(requests), "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4
    assert lines[1] == {"error": "bad_request", "message": lines[1]["message"], "line": 2}
    assert lines[2]["error"] == "user_not_found" and lines[2]["line"] == 3
    rec = TwoStageRecommender.from_model_dir(run_dir / "model")
    same = rec.recommend(RecommendationRequest("u0", top_k=4, as_of=1_700_000_000))
    assert lines[0]["recommendations"] == same.items and lines[0]["as_of"] == 1_700_000_000
    assert lines[3]["as_of"] == 1_700_000_000 and len(lines[3]["recommendations"]) == 3
    assert set(lines[0]) >= {"user_id", "recommendations", "model_version", "fallback", "degraded", "timings_ms"}


@pytest.mark.parametrize(("content", "fragment"), [(None, "no such file"), ("", "no requests")])
def test_recommend_requests_refuses_a_missing_or_empty_file_with_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, fragment: str
) -> None:
    requests = tmp_path / "requests.jsonl"
    if content is not None:
        requests.write_text(content)
    out = tmp_path / "answers.jsonl"
    assert main(["recommend", "--model", str(run_dir / "model"), "--requests", str(requests), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == ([requests] if content is not None else [])


def test_run_keeps_freed_memory_unless_told_to_release_it(
    run_dir: Path, allocator_calls: list[str], tmp_path: Path
) -> None:
    assert allocator_calls == ["keep"]  # run_dir's run, with the default
    bad = tmp_path / "inter.csv"
    bad.write_text("user_id,item_id,rating,timestamp\nu1,i1,5,100\nu1,i2,oops,101\n")
    assert main(["run", "--dataset", "csv", "--interactions", str(bad), "--out", str(tmp_path / "out"),
                 "--no-progress", "--release-memory"]) == 2
    assert allocator_calls == ["keep"]


def test_bad_csv_fails_cleanly_without_partial_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "inter.csv"
    bad.write_text("user_id,item_id,rating,timestamp\nu1,i1,5,100\nu1,i2,oops,101\n")
    out = tmp_path / "out"
    assert main(["run", "--dataset", "csv", "--interactions", str(bad), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "inter.csv" in err and "rating" in err
    assert not (out / "model").exists()


def test_sagemaker_training_job_mode_reads_channels_and_writes_sm_model_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.datasets import generate_synthetic

    data = generate_synthetic(n_users=120, n_items=150, seed=3)
    channel = tmp_path / "input" / "data" / "interactions"
    channel.mkdir(parents=True)
    data.interactions.to_csv(channel / "part-0.csv", index=False)
    model_dir, output_dir = tmp_path / "model", tmp_path / "output" / "data"
    monkeypatch.setenv("SM_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("SM_OUTPUT_DATA_DIR", str(output_dir))
    monkeypatch.setenv("SM_CHANNEL_INTERACTIONS", str(channel))
    assert main(["run", "--epochs", "2", "--dim", "8", "--sequence-epochs", "2", "--no-baselines", "--no-ablations",
                 "--no-progress"]) == 0
    artifact = load_artifact(model_dir, verify_checksums=True)  # the files sit at SM_MODEL_DIR's root
    assert artifact.manifest.dataset == "csv" and artifact.manifest.n_users == 120
    assert json.loads((output_dir / "metrics.json").read_text())["dataset"] == "csv"


def test_the_artifact_holds_each_users_interactions_in_time_order(run_dir: Path) -> None:
    from training.datasets import generate_synthetic

    data = generate_synthetic(n_users=300, n_items=400, seed=0).interactions
    artifact = load_artifact(run_dir / "model")
    u = artifact.user_ids.index("u0")
    a, b = artifact.seen_indptr[u], artifact.seen_indptr[u + 1]
    got = [artifact.item_ids[i] for i in artifact.seen_indices[a:b]]
    mine = data[data["user_id"] == "u0"].sort_values("timestamp", kind="stable")
    assert got[-1] in set(mine["item_id"][mine["timestamp"] == mine["timestamp"].max()])
    assert sorted(got) == sorted(mine["item_id"]) and len(got) == len(mine)
    np.testing.assert_array_equal(artifact.seen_timestamps[a:b], mine["timestamp"].to_numpy())
    np.testing.assert_allclose(artifact.seen_rating_sums[b - 1], mine["rating"].sum())
    assert artifact.manifest.data_end == int(data["timestamp"].max()) + 1
    # Every item's timeline holds every interaction of that item, in time order.
    i = artifact.item_ids.index(got[-1])
    s, e = artifact.item_timeline_indptr[i], artifact.item_timeline_indptr[i + 1]
    theirs = data[data["item_id"] == got[-1]]
    np.testing.assert_array_equal(artifact.item_timeline_timestamps[s:e], np.sort(theirs["timestamp"].to_numpy()))
    assert int(artifact.item_timeline_indptr[-1]) == len(data)


def test_prepare_splits_the_encoded_ids_into_leave_last_outs_rows() -> None:
    # The pipeline splits integer codes (no string sort or per-part lookups); the result must be
    # the frame split's rows, encoded, in the same order, and the same histories.
    import pandas as pd

    from training.datasets import Dataset
    from training.indexing import build_index
    from training.interactions import Encoded, Histories
    from training.pipeline import PipelineConfig, _prepare
    from training.split import leave_last_out
    from twostage_rec import schema

    rng = np.random.default_rng(3)
    n = 4000
    frame = pd.DataFrame(
        {
            schema.USER_ID: pd.Series([f"u{u}" for u in rng.integers(0, 500, n)], dtype="str"),
            schema.ITEM_ID: pd.Series([f"i{i}" for i in rng.permutation(n)], dtype="str"),
            schema.RATING: rng.integers(1, 6, n).astype(np.float32),
            schema.TIMESTAMP: rng.integers(0, 20, n).astype(np.int64),  # many same-second ties
        }
    )
    items = pd.DataFrame({schema.ITEM_ID: frame[schema.ITEM_ID]})
    data = _prepare(Dataset("ties", frame, items, schema.ITEM_ID, (1.0, 5.0)), PipelineConfig(evaluation_users=100))
    users, item_index = build_index(frame[schema.USER_ID]), build_index(frame[schema.ITEM_ID])
    assert data.users.ids == users.ids and data.items.ids == item_index.ids
    split = leave_last_out(frame)
    train, val, test = (Encoded.of(part, users, item_index) for part in (split.train, split.validation, split.test))
    train_val = train.concat(val)
    everything = train_val.concat(test)
    for got, want in ((data.train, train), (data.train_val, train_val), (data.everything, everything)):
        for column in ("user_idx", "item_idx", "rating", "timestamp"):
            np.testing.assert_array_equal(getattr(got, column), getattr(want, column))
    for got_h, rows in ((data.h_train, train), (data.h_train_val, train_val), (data.h_all, everything)):
        want_h = Histories.of(rows, len(users))
        for column in ("indptr", "items", "timestamps", "ratings"):
            np.testing.assert_array_equal(getattr(got_h, column), getattr(want_h, column))
