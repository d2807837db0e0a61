"""Interaction data sources, all returning a validated :class:`Dataset`.

``load_dataset(name, **options)`` picks the loader: "ml-100k" / "ml-1m" (``cache_dir``),
"amazon" (``reviews``, ``meta``), "csv" (``interactions``, ``items``, ``columns``,
``item_columns``) or "synthetic" (``n_users``, ``n_items``, ``interactions_per_user``, ``dim``,
``seed``; with ``n_interactions``, the long-tail shape of :func:`generate_long_tail`). Every loader goes through :func:`validate_interactions`, so bad input surfaces as a
:class:`DataError` naming the file, column and row.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .amazon import load_amazon
from .csvfile import load_csv
from .dataset import DataError, Dataset, validate_interactions, validate_items
from .movielens import default_cache_dir, load_movielens
from .synthetic import generate_long_tail, generate_synthetic

__all__ = [
    "DATASET_NAMES",
    "DataError",
    "Dataset",
    "default_cache_dir",
    "generate_long_tail",
    "generate_synthetic",
    "load_amazon",
    "load_csv",
    "load_dataset",
    "load_movielens",
    "validate_interactions",
    "validate_items",
]

def _synthetic(n_interactions: int | None = None, **options: Any) -> Dataset:
    """The long-tail shape when a number of interactions is given, else the fixed-per-user one."""
    if n_interactions is not None:
        return generate_long_tail(n_interactions, **options)
    return generate_synthetic(**options)


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "ml-100k": functools.partial(load_movielens, "ml-100k"),
    "ml-1m": functools.partial(load_movielens, "ml-1m"),
    "amazon": load_amazon,
    "csv": load_csv,
    "synthetic": _synthetic,
}
DATASET_NAMES: tuple[str, ...] = tuple(_LOADERS)


def load_dataset(name: str, **options: Any) -> Dataset:
    """Load dataset ``name`` (one of ``DATASET_NAMES``) with its loader's keyword options."""
    if name not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return _LOADERS[name](**options)
