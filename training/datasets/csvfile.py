"""The user's own interaction log (and optional item metadata) as CSV files."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from twostage_rec import schema

from .dataset import ITEM_METADATA_COLUMNS, DataError, Dataset, complete_catalog, validate_interactions, validate_items


def load_csv(
    interactions: Path,
    items: Path | None = None,
    columns: Mapping[str, str] | None = None,
    item_columns: Mapping[str, str] | None = None,
) -> Dataset:
    """Load ``user_id,item_id,rating,timestamp`` rows (UTF-8, comma-separated, with a header).

    ``columns`` / ``item_columns`` map our column name to the file's (e.g. ``{"user_id": "uid"}``);
    other columns are ignored. Ids are read as text, so "007" stays "007". ``items`` needs an
    ``item_id`` column plus any of category, price, year, title. The rating scale is the
    observed (min, max). Errors name the file, column and 1-based data row (header excluded).
    """
    names = {col: (columns or {}).get(col, col) for col in schema.INTERACTION_COLUMNS}
    frame = validate_interactions(read_csv_columns(interactions, names.values()), interactions, columns=columns)
    catalog = None
    if items is not None:
        item_names = {col: (item_columns or {}).get(col, col) for col in (schema.ITEM_ID, *ITEM_METADATA_COLUMNS)}
        catalog = validate_items(read_csv_columns(items, item_names.values()), items, columns=item_columns)
    ratings = frame[schema.RATING]
    return Dataset(
        name="csv",
        interactions=frame,
        items=complete_catalog(catalog, frame),
        item_id_field=schema.ITEM_ID,
        rating_scale=(float(ratings.min()), float(ratings.max())),
    )


def read_csv_columns(path: Path, wanted: Iterable[str]) -> pd.DataFrame:
    """The wanted columns present in ``path``, all as text; index = 1-based data row.

    Errors opening or parsing the file are :class:`DataError` naming it.
    """
    keep = set(wanted)
    try:
        # keep_default_na=False: "NA" or "null" can be real ids; empty cells stay "" for validation.
        # utf-8-sig: spreadsheet exports start with a byte-order mark that would rename column 1.
        frame = pd.read_csv(
            path, dtype=str, keep_default_na=False, encoding="utf-8-sig", usecols=lambda col: col in keep
        )
    except OSError as error:  # missing file, a directory, no permission
        raise DataError(f"cannot open ({error.strerror or error})", source=path) from error
    except pd.errors.EmptyDataError as error:
        raise DataError("empty file", source=path) from error
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataError(f"not a readable CSV file ({error})", source=path) from error
    frame.index = np.arange(1, len(frame) + 1)
    return frame
