"""Recording events: the compare-and-set loop (against an in-memory store), the CSV, the CLI's input checks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from training.__main__ import main
from training.datasets import DataError
from training.events import UserEvent, load_events_csv, merge_write, record_events
from twostage_rec.artifact import UserHistorySchema
from twostage_rec.history_store import HistoryEvent, decode_history_record, encode_history_record

SCHEMA = UserHistorySchema("h")
E = HistoryEvent


class MemoryStore:
    """The two runtime calls the writer makes, with the online store's documented put rule."""

    def __init__(self) -> None:
        self.records: dict[str, list[dict[str, str]]] = {}
        self.before_put: Callable[[], None] | None = None  # runs once, before the next put lands
        self.puts = 0

    def version(self, user: str) -> float:
        record = self.records.get(user)
        return -1.0 if record is None else float(next(f["ValueAsString"] for f in record
                                                      if f["FeatureName"] == "event_time"))

    def put_record(self, FeatureGroupName: str, Record: list[dict[str, str]]) -> dict:  # noqa: N803
        hook, self.before_put = self.before_put, None
        if hook:
            hook()
        self.puts += 1
        user = next(f["ValueAsString"] for f in Record if f["FeatureName"] == "user_id")
        new = float(next(f["ValueAsString"] for f in Record if f["FeatureName"] == "event_time"))
        if new > self.version(user):  # strictly greater, as AWS documents
            self.records[user] = Record
        return {}

    def batch_get_record(self, Identifiers: list[dict[str, Any]]) -> dict:  # noqa: N803
        ids = Identifiers[0]["RecordIdentifiersValueAsString"]
        return {"Records": [{"FeatureGroupName": "h", "RecordIdentifierValueAsString": i, "Record": self.records[i]}
                            for i in ids if i in self.records], "Errors": [], "UnprocessedIdentifiers": []}

    def events(self, user: str) -> list[HistoryEvent]:
        return decode_history_record(SCHEMA, self.records[user])


def no_sleep(_: float) -> None:
    pass


def test_first_write_then_merge_and_idempotent_rerecording() -> None:
    store = MemoryStore()
    report = record_events(store, SCHEMA, [UserEvent("u", "a", 5), UserEvent("u", "b", 3), UserEvent("v", "c", 1)],
                           max_length=10, show_progress=False)
    assert report.ok and (report.events_stored, report.users_stored, report.writes) == (3, 2, 2)
    assert store.events("u") == [E("b", 3), E("a", 5)] and store.version("u") == 1
    record_events(store, SCHEMA, [UserEvent("u", "d", 4)], max_length=10, show_progress=False)
    assert store.events("u") == [E("b", 3), E("d", 4), E("a", 5)] and store.version("u") == 2
    again = record_events(store, SCHEMA, [UserEvent("u", "d", 4)], max_length=10, show_progress=False)
    assert again.ok and again.writes == 0 and store.version("u") == 2  # already there: nothing written


def test_a_lost_version_is_merged_again_and_retried() -> None:
    store = MemoryStore()
    store.records["u"] = encode_history_record(SCHEMA, "u", [E("old", 1)], 4)

    def rival() -> None:  # another writer read version 4 too, and lands version 5 first
        store.records["u"] = encode_history_record(SCHEMA, "u", [E("old", 1), E("theirs", 3)], 5)

    store.before_put = rival
    slept: list[float] = []
    report = merge_write(store, SCHEMA, {"u": [E("mine", 2)]}, max_length=10, sleep=slept.append)
    assert report.ok and report.conflicts == 1 and report.writes == 2 and len(slept) == 1
    assert store.events("u") == [E("old", 1), E("mine", 2), E("theirs", 3)]
    assert store.version("u") == 6


def test_events_older_than_the_window_count_as_stored() -> None:
    store = MemoryStore()
    newer = [E(f"n{i}", 100 + i) for i in range(3)]
    store.records["u"] = encode_history_record(SCHEMA, "u", newer, 9)
    report = merge_write(store, SCHEMA, {"u": [E("ancient", 1)]}, max_length=3, sleep=no_sleep)
    assert report.ok and report.writes == 0 and store.events("u") == newer


def test_gives_up_after_the_bound_with_a_clear_error() -> None:
    class AlwaysBeaten(MemoryStore):
        """A rival always lands the next version (without our event) just before our put."""

        def put_record(self, FeatureGroupName: str, Record: list[dict[str, str]]) -> dict:  # noqa: N803
            rival = max(int(self.version("u")), 0) + 1  # the version our put is about to use
            self.records["u"] = encode_history_record(SCHEMA, "u", [E(f"other{rival}", 0)], rival)
            return super().put_record(FeatureGroupName, Record)

    store = AlwaysBeaten()
    report = merge_write(store, SCHEMA, {"u": [E("mine", 1)]}, max_length=5, max_rounds=4, sleep=no_sleep)
    assert not report.ok and report.writes == 4 and report.conflicts == 4
    assert report.failures[0].user_id == "u" and report.failures[0].events == 1
    assert "after 4 merge-write attempts (other writers kept winning" in report.failures[0].message


def test_malformed_stored_record_and_client_errors_fail_only_that_user() -> None:
    store = MemoryStore()
    store.records["bad"] = [{"FeatureName": "user_id", "ValueAsString": "bad"},
                            {"FeatureName": "event_time", "ValueAsString": "3"},
                            {"FeatureName": "item_ids", "ValueAsString": "[oops"},
                            {"FeatureName": "timestamps", "ValueAsString": "[]"}]
    report = merge_write(store, SCHEMA, {"bad": [E("a", 1)], "good": [E("b", 2)]}, max_length=5, sleep=no_sleep)
    assert [f.user_id for f in report.failures] == ["bad"] and "malformed" in report.failures[0].message
    assert report.events_stored == 1 and store.events("good") == [E("b", 2)]

    class Down(MemoryStore):
        def batch_get_record(self, Identifiers: list[dict[str, Any]]) -> dict:  # noqa: N803
            raise ConnectionError("refused")

    report = merge_write(Down(), SCHEMA, {"a": [E("x", 1)], "b": [E("y", 1), E("z", 2)]}, max_length=5)
    assert report.events_failed == 3 and all("ConnectionError: refused" in f.message for f in report.failures)


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_events_csv(tmp_path: Path) -> None:
    rows = write_csv(tmp_path / "e.csv", "user_id,item_id,timestamp,extra\nu1,i1,100,x\nu1,i1,100.9,y\nu2,007,99,z\n")
    assert load_events_csv(rows, now=5) == [UserEvent("u1", "i1", 100), UserEvent("u1", "i1", 100),
                                            UserEvent("u2", "007", 99)]
    iso = write_csv(tmp_path / "iso.csv",
                    "user_id,item_id,timestamp\nu,i,2023-11-14T22:13:20Z\nu,j,2023-11-14T22:13:21\n")
    assert [e.timestamp for e in load_events_csv(iso, now=5)] == [1700000000, 1700000001]
    no_time = write_csv(tmp_path / "now.csv", "item_id,user_id\ni,u\n")
    assert load_events_csv(no_time, now=42) == [UserEvent("u", "i", 42)]


@pytest.mark.parametrize(("text", "message"), [
    ("user_id,timestamp\nu,1\n", "column 'item_id': missing required column"),
    ("user_id,item_id,timestamp\nu,i,1\nu,i,soon\n", "line 3, column 'timestamp': timestamp is not a number ('soon')"),
    ("user_id,item_id,timestamp\nu,i,1\n ,i,2\n", "line 3, column 'user_id': empty id"),
    ("user_id,item_id\n", "no data rows"),
    ("", "empty file"),
])
def test_load_events_csv_names_the_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = write_csv(tmp_path / "events.csv", text)
    with pytest.raises(DataError) as raised:
        load_events_csv(path, now=0)
    assert str(raised.value).startswith(str(path)) and message in str(raised.value)


@pytest.fixture
def no_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(("args", "message"), [
    (["--file", "{bad}"], "bad.csv, line 2, column 'timestamp': timestamp is neither epoch seconds nor an ISO 8601 "
                          "datetime ('x'); nothing stored (0 events)"),
    (["--user-id", "u"], "give --user-id and --item-id (one event) or --file PATH"),
    (["--user-id", " ", "--item-id", "i"], "give --user-id and --item-id"),
    (["--file", "{bad}", "--user-id", "u"], "leave out --user-id"),
    (["--user-id", "u", "--item-id", "i", "--timestamp", "tuesday"], "--timestamp 'tuesday'"),
    (["--user-id", "u", "--item-id", "i", "--timestamp", "nan"], "--timestamp 'nan'"),
    (["--user-id", "u", "--item-id", "i", "--history-length", "0"], "must be at least 1"),
    (["--user-id", "u", "--item-id", "i"], "no region: pass --region or set AWS_REGION"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_aws: None,
                                              args: list[str], message: str) -> None:
    bad = write_csv(tmp_path / "bad.csv", "user_id,item_id,timestamp\nu,i,x\n")
    argv = ["events", "put", "--feature-group", "h", *[a.replace("{bad}", str(bad)) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err


def test_user_history_schema_defaults_to_the_manifest_then_the_item_group_name() -> None:
    from types import SimpleNamespace

    from training.feature_store import user_history_schema

    items = SimpleNamespace(feature_group_name="ml-100k-items")
    bare = SimpleNamespace(user_history=None, feature_store=items)
    assert user_history_schema(bare) == UserHistorySchema("ml-100k-user-history")  # type: ignore[arg-type]
    named = SimpleNamespace(user_history=UserHistorySchema("trained", item_ids_feature_name="items"),
                            feature_store=items)
    expected = UserHistorySchema("trained", item_ids_feature_name="items")
    assert user_history_schema(named) == expected  # type: ignore[arg-type]
    assert user_history_schema(named, "override").feature_group_name == "override"  # type: ignore[arg-type]
