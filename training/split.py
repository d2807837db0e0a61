"""Temporal leave-last-out split: each user's last interaction is test, the one before validation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from twostage_rec import schema

MIN_INTERACTIONS_TO_HOLD_OUT = 3  # one for train, one for validation, one for test
# Rows sorted at a time: a block's keys, ties and row numbers (~24 bytes a row, 1.5 MB) stay in
# a core's L2 cache. One lexsort of 10M rows cost ~19x one of 1M here (cache misses, not the log
# factor), in blocks of this size ~15x; the rest of the growth was fresh pages (allocator.py).
SORT_BLOCK_ROWS = 1 << 16
# Fixed 16-byte key: the tie order must be identical on every run, machine and process.
_TIE_HASH_KEY = "twostage-rec-tie"


@dataclass(frozen=True, eq=False)  # eq=False: comparing DataFrames with == is not a bool
class Split:
    """Interaction frames with the input's columns; validation/test hold one row per eligible user."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame


@dataclass(frozen=True, eq=False)
class HoldOut:
    """A leave-last-out split as row positions into the input.

    ``order`` is every row in (user, time, tie hash) order; ``part[k]`` says where ``order[k]``
    goes: 0 train, 1 validation, 2 test. So ``order[part <= 1]`` is train plus validation already
    in that order, and the parts never need sorting again.
    """

    order: np.ndarray  # int64 row positions
    part: np.ndarray  # int8, aligned with order

    TRAIN = 0
    VALIDATION = 1
    TEST = 2

    def rows(self, part: int) -> np.ndarray:
        """The input rows of one part, in (user, time, tie) order."""
        return self.order[self.part == part]


def tie_hash(interactions: pd.DataFrame) -> np.ndarray:
    """Each row's keyed hash of (user_id, item_id): the order of same-second interactions.

    Categorical id columns hash as their values do (pandas hashes each category once), so
    encoded ids give the same hashes without a string per row.
    """
    return pd.util.hash_pandas_object(
        interactions[[schema.USER_ID, schema.ITEM_ID]], index=False, hash_key=_TIE_HASH_KEY
    ).to_numpy()


def hold_out(user_codes: np.ndarray, timestamps: np.ndarray, ties: np.ndarray) -> HoldOut:
    """The split on integer columns: ``user_codes`` any non-negative user codes (their order is
    the users' order in the output), ``ties`` from :func:`tie_hash`. All aligned, one per row."""
    order = _sorted_rows(user_codes, (ties, *_user_time_keys(user_codes, timestamps)))
    sorted_users = user_codes[order]
    counts = np.bincount(sorted_users)
    group_end = np.cumsum(counts)[sorted_users]  # one past each row's last sibling
    from_end = group_end - np.arange(len(order)) - 1  # 0 = the user's last row
    eligible = counts[sorted_users] >= MIN_INTERACTIONS_TO_HOLD_OUT
    part = np.full(len(order), HoldOut.TRAIN, dtype=np.int8)
    part[eligible & (from_end == 1)] = HoldOut.VALIDATION
    part[eligible & (from_end == 0)] = HoldOut.TEST
    return HoldOut(order, part)


def _sorted_rows(user_codes: np.ndarray, keys: tuple[np.ndarray, ...]) -> np.ndarray:
    """``np.lexsort(keys)``, whose last (primary) key orders rows by user first, computed a block
    of consecutive users at a time.

    Each block holds about ``SORT_BLOCK_ROWS`` rows; a stable radix pass on the block number
    gathers its rows (still in input order, so ties keep lexsort's order), then a lexsort in
    cache orders them. The blocks follow each other in user order, so their concatenation is
    the whole lexsort.
    """
    n_rows = len(user_codes)
    n_blocks = -(-n_rows // SORT_BLOCK_ROWS)
    if n_blocks <= 1:
        return np.lexsort(keys)
    rows_of_user = np.bincount(user_codes)
    rows_before_user = np.cumsum(rows_of_user) - rows_of_user
    # numpy's stable sort of 16-bit keys is a radix sort (linear); wider ones are a merge sort.
    block_type = np.uint16 if n_blocks <= np.iinfo(np.uint16).max else np.int64
    block_of_row = np.minimum(rows_before_user * n_blocks // n_rows, n_blocks - 1).astype(block_type)[user_codes]
    by_block = np.argsort(block_of_row, kind="stable")
    block_sizes = np.bincount(block_of_row, minlength=n_blocks)
    order = np.empty(n_rows, dtype=np.int64)
    start = 0
    for size in block_sizes.tolist():
        rows = by_block[start : start + size]
        order[start : start + size] = rows[np.lexsort(tuple(key[rows] for key in keys))]
        start += size
    return order


def _user_time_keys(user_codes: np.ndarray, timestamps: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sort keys, least significant first, ordering rows by user then time: one combined int64
    key when it cannot overflow (a sort pass fewer: ~30% of the split's sort at 10M rows)."""
    if not len(user_codes) or not np.issubdtype(timestamps.dtype, np.integer):
        return timestamps, user_codes
    earliest = int(timestamps.min())
    span = int(timestamps.max()) - earliest + 1
    if (int(user_codes.max()) + 1) * span >= 2**62:
        return timestamps, user_codes
    return (user_codes.astype(np.int64) * span + (timestamps - earliest),)


def leave_last_out(interactions: pd.DataFrame) -> Split:
    """Hold out each user's last interaction as test and the one before as validation.

    Users are ordered by user_id; each user's rows by timestamp, with same-second ties ordered by
    a keyed hash of (user_id, item_id). Never by item id: an id order would make the held-out
    item predictable from ids, and a re-ranker would learn that leak. Users with fewer than
    ``MIN_INTERACTIONS_TO_HOLD_OUT`` interactions stay whole in train. Train keeps that
    (user, time) order; every frame has a fresh RangeIndex. The pipeline splits its integer
    columns with :func:`hold_out` instead, the same rows in the same order.
    """
    missing = [col for col in (schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP) if col not in interactions.columns]
    if missing:
        raise ValueError(f"interactions lack column {missing[0]!r}")
    user_codes, _ = pd.factorize(interactions[schema.USER_ID], sort=True)
    split = hold_out(user_codes, interactions[schema.TIMESTAMP].to_numpy(), tie_hash(interactions))

    def frame(part: int) -> pd.DataFrame:
        return interactions.iloc[split.rows(part)].reset_index(drop=True)

    return Split(train=frame(HoldOut.TRAIN), validation=frame(HoldOut.VALIDATION), test=frame(HoldOut.TEST))
