"""The loaded dataset, its error type and the one validation path every loader goes through."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from twostage_rec import schema

logger = logging.getLogger(__name__)

ITEM_METADATA_COLUMNS: tuple[str, ...] = (schema.CATEGORY, schema.PRICE, schema.YEAR, schema.TITLE)
_NUMERIC_METADATA = (schema.PRICE, schema.YEAR)

# check(column, bad_mask, problem): raise a DataError naming the first bad row, if any.
Check = Callable[[str, "pd.Series | np.ndarray", str], None]


@dataclass(frozen=True, eq=False)  # eq=False: comparing DataFrames with == is not a bool
class Dataset:
    """Interactions plus the item catalog, in the shared column vocabulary.

    ``interactions`` has exactly ``schema.INTERACTION_COLUMNS`` (user_id and item_id str ids as
    ``category`` columns whose categories are the distinct ids in sorted order, so a row holds a
    code and not a string; rating float32, timestamp int64 seconds), one row per (user, item),
    sorted by timestamp.
    ``items`` is the catalog: ``item_id`` (unique str) plus whichever of category (str/NaN),
    price, year (float64/NaN) and title (str/NaN) the source has. It contains every interacted
    item (metadata NaN when the source had none) and may contain items nobody interacted with.
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    item_id_field: str
    rating_scale: tuple[float, float]


class DataError(ValueError):
    """Bad input data; the message names the file, column and row (or line) when known."""

    def __init__(
        self,
        problem: str,
        *,
        source: str | Path | None = None,
        column: str | None = None,
        row: int | None = None,
        unit: str = "row",
    ) -> None:
        self.source, self.column, self.row = source, column, row
        where = [str(source)] if source is not None else []
        if row is not None:
            where.append(f"{unit} {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)


def validate_interactions(
    raw: pd.DataFrame,
    source: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    unit: str = "row",
    timestamps_per_second: int = 1,
) -> pd.DataFrame:
    """Check and type a raw interaction table; return it in ``schema.INTERACTION_COLUMNS``.

    ``raw`` holds the source's columns (ids as str, numbers as str or numbers) and its index is
    the 1-based row or line number that errors report. ``columns`` maps our column name to the
    source's. Timestamps are epoch numbers in 1/``timestamps_per_second`` units (floored to
    seconds) or, when no value is numeric, ISO 8601 datetimes (naive ones read as UTC).
    Duplicate (user, item) rows keep the LAST by timestamp (equal timestamps: the later row in
    the file), because a re-rating replaces the earlier opinion; the count is logged.
    """
    names = {col: (columns or {}).get(col, col) for col in schema.INTERACTION_COLUMNS}
    _require_columns(raw, source, list(names.values()))
    if raw.empty:
        raise DataError("no data rows", source=source)
    check = functools.partial(_raise_first_bad, raw, source=source, unit=unit)

    user_ids, user_codes = _sorted_categorical(*_ids(raw[names[schema.USER_ID]], check))
    item_ids, item_codes = _sorted_categorical(*_ids(raw[names[schema.ITEM_ID]], check))
    rating = _numbers(raw[names[schema.RATING]])
    check(names[schema.RATING], ~np.isfinite(rating), "rating is not a number")
    timestamps = _timestamps(raw[names[schema.TIMESTAMP]], timestamps_per_second, check)

    # Deduplicate on the integer codes: hashing a million id strings again would double load time.
    order = np.argsort(timestamps.to_numpy(), kind="stable")
    pair = user_codes.astype(np.int64) * (int(item_codes.max()) + 1) + item_codes
    latest = order[~pd.Series(pair[order]).duplicated(keep="last").to_numpy()]
    if len(latest) < len(raw):
        dropped = len(raw) - len(latest)
        logger.warning("%s: dropped %d duplicate (user_id, item_id) rows, kept the latest of each", source, dropped)
    columns_out = {
        schema.USER_ID: user_ids,
        schema.ITEM_ID: item_ids,
        schema.RATING: rating.astype("float32"),
        schema.TIMESTAMP: timestamps.astype("int64"),
    }
    return pd.DataFrame({col: values.iloc[latest].reset_index(drop=True) for col, values in columns_out.items()})


def validate_events(
    raw: pd.DataFrame, source: str | Path, *, default_timestamp: int, unit: str = "row"
) -> pd.DataFrame:
    """Check and type a raw event table: ``user_id``, ``item_id`` and an optional ``timestamp``.

    Same conventions as :func:`validate_interactions` for ids and timestamps; a missing
    ``timestamp`` column means ``default_timestamp`` for every row. Row order and repeated
    (user, item) rows are kept: every row is an event. Returns user_id, item_id, timestamp (int64).
    """
    _require_columns(raw, source, [schema.USER_ID, schema.ITEM_ID])
    if raw.empty:
        raise DataError("no data rows", source=source)
    check = functools.partial(_raise_first_bad, raw, source=source, unit=unit)
    if schema.TIMESTAMP in raw.columns:
        timestamps = _timestamps(raw[schema.TIMESTAMP], 1, check).to_numpy()
    else:
        timestamps = np.full(len(raw), default_timestamp)
    return pd.DataFrame({
        schema.USER_ID: _ids(raw[schema.USER_ID], check)[0].to_numpy(),
        schema.ITEM_ID: _ids(raw[schema.ITEM_ID], check)[0].to_numpy(),
        schema.TIMESTAMP: timestamps.astype("int64"),
    })


def validate_items(
    raw: pd.DataFrame,
    source: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    unit: str = "row",
) -> pd.DataFrame:
    """Check and type a raw item metadata table: ``item_id`` plus the metadata columns it has.

    Empty strings mean unknown; price and year must be numbers when given. A repeated item_id
    keeps its first row (logged). Same conventions as :func:`validate_interactions`.
    """
    names = {col: (columns or {}).get(col, col) for col in (schema.ITEM_ID, *ITEM_METADATA_COLUMNS)}
    _require_columns(raw, source, [names[schema.ITEM_ID]])
    check = functools.partial(_raise_first_bad, raw, source=source, unit=unit)
    out = {schema.ITEM_ID: _ids(raw[names[schema.ITEM_ID]], check)[0].astype("str")}
    for col in ITEM_METADATA_COLUMNS:
        if names[col] not in raw.columns:
            continue
        values = raw[names[col]].replace("", np.nan)
        if col in _NUMERIC_METADATA:
            out[col] = _numbers(values)
            check(names[col], out[col].isna() & values.notna(), f"{col} is not a number")
        else:
            out[col] = values.astype("str")
    frame = pd.DataFrame(out).reset_index(drop=True)
    unique = frame.drop_duplicates(schema.ITEM_ID, keep="first")
    if len(unique) < len(frame):
        logger.warning("%s: ignored %d repeated item ids, kept the first row of each", source, len(frame) - len(unique))
    return unique.reset_index(drop=True)


def _raise_first_bad(
    raw: pd.DataFrame, column: str, bad: pd.Series | np.ndarray, problem: str, *, source: str | Path, unit: str
) -> None:
    """Raise a DataError naming the first row where ``bad`` holds, quoting its raw value."""
    bad = np.asarray(bad, dtype=bool)
    if bad.any():
        pos = int(bad.argmax())
        value = raw[column].iloc[pos]
        raise DataError(f"{problem} ({value!r})", source=source, column=column, row=int(raw.index[pos]), unit=unit)


def _ids(values: pd.Series, check: Check) -> tuple[pd.Series, np.ndarray, list[str]]:
    """The ids as str, their integer codes and the distinct ids in code order (first appearance);
    blank ids are an error. A categorical column is coded already: its codes are factorised, not
    its strings."""
    if isinstance(values.dtype, pd.CategoricalDtype) and pd.api.types.is_string_dtype(values.cat.categories.dtype):
        ids = values
        codes, uniques = pd.factorize(values)  # by the codes; uniques: the categories used
    else:
        ids = values.astype("str")
        codes, uniques = pd.factorize(ids)
    check(str(values.name), codes < 0, "empty id")
    # Strip the distinct values only: stripping a million strings costs a second.
    distinct = pd.Series(uniques, dtype="str")
    blank = np.asarray(distinct.str.strip() == "")
    check(str(values.name), blank[codes], "empty id")
    return ids, codes, distinct.tolist()


def _sorted_categorical(ids: pd.Series, codes: np.ndarray, uniques: list[str]) -> tuple[pd.Series, np.ndarray]:
    """``ids`` (coded by ``codes`` into ``uniques``) as a categorical over their sorted distinct
    values, and its codes.

    The split and the id index read the codes instead of hashing every row's string again (at
    10M rows that hash was over a third of the split), and rows gather as integers. Sorted categories
    keep the order of the strings themselves: ``factorize(sort=True)`` and sorts agree.
    """
    by_value = sorted(range(len(uniques)), key=uniques.__getitem__)  # Python's str order, as pandas sorts
    rank = np.empty(len(uniques), dtype=np.int32)
    rank[by_value] = np.arange(len(uniques), dtype=np.int32)
    sorted_codes = rank[codes]
    categories = pd.Index([uniques[i] for i in by_value], dtype="str")
    column = pd.Series(pd.Categorical.from_codes(sorted_codes, dtype=pd.CategoricalDtype(categories)), index=ids.index)
    return column.rename(ids.name), sorted_codes


def _numbers(values: pd.Series) -> pd.Series:
    """float64, NaN where a value is not a number."""
    try:
        return values.astype("float64")  # 5x faster than to_numeric when every value parses
    except (ValueError, TypeError):
        return pd.to_numeric(values, errors="coerce").astype("float64")


def _timestamps(values: pd.Series, per_second: int, check: Check) -> pd.Series:
    column = str(values.name)
    # float64 holds whole seconds and milliseconds exactly up to 2**53; beyond is not a real clock.
    numbers = _numbers(values)
    bad = ~np.isfinite(numbers) | (numbers.abs() > 2**53)
    if bad.all() and values.notna().any():
        parsed = pd.to_datetime(values, errors="coerce", utc=True, format="ISO8601")
        check(column, parsed.isna(), "timestamp is neither epoch seconds nor an ISO 8601 datetime")
        return parsed.astype("datetime64[s, UTC]").astype("int64")
    check(column, bad, "timestamp is not a number")
    return np.floor(numbers / per_second).astype("int64")


def complete_catalog(items: pd.DataFrame | None, interactions: pd.DataFrame) -> pd.DataFrame:
    """Append interacted items missing from ``items`` with NaN metadata (sorted, deterministic)."""
    interacted = pd.Series(pd.unique(interactions[schema.ITEM_ID]), dtype="str")
    if items is None:
        return pd.DataFrame({schema.ITEM_ID: interacted.sort_values(ignore_index=True)})
    missing = interacted[~interacted.isin(items[schema.ITEM_ID])].sort_values(ignore_index=True)
    if missing.empty:
        return items.reset_index(drop=True)
    extra = pd.DataFrame({schema.ITEM_ID: missing}).reindex(columns=items.columns)
    return pd.concat([items, extra.astype(items.dtypes.to_dict())], ignore_index=True)


def _require_columns(raw: pd.DataFrame, source: str | Path, wanted: list[str]) -> None:
    missing = [col for col in wanted if col not in raw.columns]
    if missing:
        raise DataError("missing required column", source=source, column=missing[0])
