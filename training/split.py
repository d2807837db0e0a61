"""Temporal leave-last-out split: each user's last interaction is test, the one before validation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from twostage_rec import schema

MIN_INTERACTIONS_TO_HOLD_OUT = 3  # one for train, one for validation, one for test
# Fixed 16-byte key: the tie order must be identical on every run, machine and process.
_TIE_HASH_KEY = "twostage-rec-tie"


@dataclass(frozen=True, eq=False)  # eq=False: comparing DataFrames with == is not a bool
class Split:
    """Interaction frames with the input's columns; validation/test hold one row per eligible user."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame


def leave_last_out(interactions: pd.DataFrame) -> Split:
    """Hold out each user's last interaction as test and the one before as validation.

    Users are ordered by user_id; each user's rows by timestamp, with same-second ties ordered by
    a keyed hash of (user_id, item_id). Never by item id: an id order would make the held-out
    item predictable from ids, and a re-ranker would learn that leak. Users with fewer than
    ``MIN_INTERACTIONS_TO_HOLD_OUT`` interactions stay whole in train. Train keeps that
    (user, time) order; every frame has a fresh RangeIndex.
    """
    missing = [col for col in (schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP) if col not in interactions.columns]
    if missing:
        raise ValueError(f"interactions lack column {missing[0]!r}")
    user_codes, _ = pd.factorize(interactions[schema.USER_ID], sort=True)
    tie_break = pd.util.hash_pandas_object(
        interactions[[schema.USER_ID, schema.ITEM_ID]], index=False, hash_key=_TIE_HASH_KEY
    ).to_numpy()
    order = np.lexsort((tie_break, interactions[schema.TIMESTAMP].to_numpy(), user_codes))

    sorted_users = user_codes[order]
    counts = np.bincount(sorted_users)
    group_end = np.cumsum(counts)[sorted_users]  # one past each row's last sibling
    from_end = group_end - np.arange(len(order)) - 1  # 0 = the user's last row
    eligible = counts[sorted_users] >= MIN_INTERACTIONS_TO_HOLD_OUT

    def rows(mask: np.ndarray) -> pd.DataFrame:
        return interactions.iloc[order[mask]].reset_index(drop=True)

    return Split(
        train=rows(~eligible | (from_end >= 2)),
        validation=rows(eligible & (from_end == 1)),
        test=rows(eligible & (from_end == 0)),
    )
