"""Amazon Reviews 2023 (McAuley lab): a reviews JSONL file plus an optional item-meta JSONL file.

Both may be gzipped and several GB, so they are streamed line by line and only the fields used
are kept. Reviews carry ``timestamp`` in milliseconds; items are identified by ``parent_asin``
(the product, across its colour/size variants ``asin``).
"""

from __future__ import annotations

import gzip
import json
import math
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from twostage_rec import schema

from .dataset import DataError, Dataset, complete_catalog, validate_interactions, validate_items

ITEM_ID_FIELD = "parent_asin"


def load_amazon(reviews: Path, meta: Path | None) -> Dataset:
    """Load Amazon Reviews 2023 ``reviews`` (and ``meta``) JSONL files, ``.gz`` or plain.

    Items get ``category`` (``main_category``, else the first of ``categories``), ``price``
    (NaN when null, "None" or not a number) and ``title``. ``average_rating`` and
    ``rating_number`` are deliberately dropped: they summarise every review ever written,
    including the held-out future, so any feature built on them leaks the test set.
    """
    # Tens of millions of reviews: share one str object per distinct id and keep numbers in
    # typed arrays, ~40 bytes a review instead of ~250 for lists of fresh Python objects.
    interned: dict[str, str] = {}

    def intern(value: Any) -> str:
        text = _id_text(value)
        return interned.setdefault(text, text)

    user_ids: list[str] = []
    item_ids: list[str] = []
    ratings, timestamps, line_numbers = array("d"), array("d"), array("q")
    for line_number, record in _records(reviews):
        user_ids.append(intern(record.get("user_id")))
        item_ids.append(intern(record.get(ITEM_ID_FIELD)))
        ratings.append(_number(record.get("rating")))
        timestamps.append(_number(record.get("timestamp")))
        line_numbers.append(line_number)
    raw = pd.DataFrame(
        {
            "user_id": user_ids,
            ITEM_ID_FIELD: item_ids,
            "rating": np.frombuffer(ratings, dtype=np.float64),
            "timestamp": np.frombuffer(timestamps, dtype=np.float64),
        },
        index=np.frombuffer(line_numbers, dtype=np.int64),
    )
    interactions = validate_interactions(
        raw, reviews, columns={schema.ITEM_ID: ITEM_ID_FIELD}, unit="line", timestamps_per_second=1000
    )
    items = _load_meta(meta) if meta is not None else None
    return Dataset(
        name="amazon",
        interactions=interactions,
        items=complete_catalog(items, interactions),
        item_id_field=ITEM_ID_FIELD,
        rating_scale=(1.0, 5.0),
    )


def _load_meta(meta: Path) -> pd.DataFrame:
    rows: dict[str, list[Any]] = {ITEM_ID_FIELD: [], schema.CATEGORY: [], schema.PRICE: [], schema.TITLE: []}
    line_numbers: list[int] = []
    for line_number, record in _records(meta):
        categories = record.get("categories") or [None]
        category = record.get("main_category") or (categories[0] if isinstance(categories, list) else None)
        title = record.get("title")
        rows[ITEM_ID_FIELD].append(_id_text(record.get(ITEM_ID_FIELD)))
        rows[schema.CATEGORY].append(category if isinstance(category, str) else "")
        rows[schema.PRICE].append(_number(record.get("price")))
        rows[schema.TITLE].append(title if isinstance(title, str) else "")
        line_numbers.append(line_number)
    raw = pd.DataFrame(rows, index=line_numbers)
    return validate_items(raw, meta, columns={schema.ITEM_ID: ITEM_ID_FIELD}, unit="line")


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, JSON object) for each non-blank line of a plain or gzipped file."""
    try:
        handle = _open(path)
    except OSError as error:
        raise DataError(f"cannot open ({error.strerror or error})", source=path) from error
    line_number = 0
    with handle:
        try:
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    yield line_number, _parse(line, path, line_number)
        except (OSError, EOFError) as error:  # a truncated or corrupt gzip stream
            raise DataError(f"unreadable ({error})", source=path, row=line_number + 1, unit="line") from error
    if line_number == 0:
        raise DataError("empty file", source=path)


def _parse(line: bytes, path: Path, line_number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)  # UTF-8 errors are ValueErrors too
    except ValueError as error:
        raise DataError(f"invalid JSON ({error})", source=path, row=line_number, unit="line") from error
    if not isinstance(record, dict):
        raise DataError("not a JSON object", source=path, row=line_number, unit="line")
    return record


def _open(path: Path) -> IO[bytes]:
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"  # magic bytes, so a misnamed file still works
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _id_text(value: Any) -> str:
    return "" if value is None else str(value)


def _number(value: Any) -> float:
    """A JSON number or numeric text ("4.0", "$12.99"); NaN for null, "None", text, bool, inf."""
    if isinstance(value, str):
        value = value.strip().lstrip("$").replace(",", "")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return math.nan
    return number if math.isfinite(number) else math.nan
