"""External string ids <-> integer positions, from memory-mapped arrays: no Python object per id.

A model with 10M users cannot keep a ``dict`` of its user ids in every model-server worker (about
1 GB each, and seconds to build at start-up). An :class:`IdTable` keeps the ids as one UTF-8 byte
array with offsets, plus a sorted array of 64-bit hashes with the position of each: a lookup
hashes the id, binary-searches the hashes and compares the bytes of the (usually one) match. All
four arrays are ``.npy`` files memory-mapped like the rest of the artifact, so every worker shares
the same pages and start-up reads nothing it does not touch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np


def id_hash(value: str) -> int:
    """The stable 64-bit hash of an id (BLAKE2b of its UTF-8 bytes): the same in training and serving."""
    return int.from_bytes(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class IdTableArrays:
    """The four arrays of an :class:`IdTable` (what the artifact writes)."""

    data: np.ndarray  # uint8: every id's UTF-8 bytes, one after the other
    offsets: np.ndarray  # int64 (n + 1,): id i is data[offsets[i]:offsets[i + 1]]
    hashes: np.ndarray  # uint64 (n,), sorted
    order: np.ndarray  # int64 (n,): the position of the id of each sorted hash

    @classmethod
    def build(cls, ids: Sequence[str]) -> IdTableArrays:
        encoded = [i.encode("utf-8") for i in ids]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        hashes = np.fromiter((id_hash(i) for i in ids), dtype=np.uint64, count=len(ids))
        order = np.argsort(hashes, kind="stable")
        return cls(data, offsets, hashes[order], order.astype(np.int64))


class IdTable(Sequence[str]):
    """A read-only sequence of ids with O(log n) lookup, backed by (memory-mapped) arrays."""

    def __init__(self, arrays: IdTableArrays) -> None:
        # Plain ndarray views: np.memmap's per-index Python hook costs more than the lookup itself.
        self._data = np.asarray(arrays.data)
        self._offsets = np.asarray(arrays.offsets)
        self._hashes = np.asarray(arrays.hashes)
        self._order = np.asarray(arrays.order)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, position: int) -> str: ...
    @overload
    def __getitem__(self, position: slice) -> list[str]: ...
    def __getitem__(self, position: int | slice) -> str | list[str]:
        if isinstance(position, slice):
            return [self._decode(i) for i in range(*position.indices(len(self)))]
        n = len(self)
        i = int(position)
        if not -n <= i < n:
            raise IndexError(f"id position {position} out of range for {n} ids")
        return self._decode(i % n)

    def __iter__(self) -> Iterator[str]:
        return (self._decode(i) for i in range(len(self)))

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and self.position(value) >= 0

    def position(self, value: str) -> int:
        """The position of ``value``, or -1 when it is not in the table."""
        h = np.uint64(id_hash(value))
        start = int(np.searchsorted(self._hashes, h, side="left"))
        if start == len(self._hashes) or self._hashes[start] != h:
            return -1
        encoded = value.encode("utf-8")
        stop = int(np.searchsorted(self._hashes, h, side="right"))
        for pos in range(start, stop):  # more than one only on a 64-bit hash collision
            i = int(self._order[pos])
            if self._data[self._offsets[i] : self._offsets[i + 1]].tobytes() == encoded:
                return i
        return -1

    def positions(self, values: Sequence[str]) -> np.ndarray:
        """int64 position of each of ``values`` (-1 when absent): one binary search for all of them."""
        if not len(values):
            return np.empty(0, dtype=np.int64)
        wanted = np.fromiter((id_hash(v) for v in values), dtype=np.uint64, count=len(values))
        start = np.searchsorted(self._hashes, wanted, side="left")
        candidate = np.minimum(start, max(len(self._hashes) - 1, 0))
        out = np.full(len(values), -1, dtype=np.int64)
        if not len(self._hashes):
            return out
        hit = self._hashes[candidate] == wanted
        for k in np.flatnonzero(hit):  # confirm the bytes (and walk past a rare hash collision)
            out[k] = (
                self.position(values[k])
                if self._collides(int(candidate[k]))
                else self._confirm(int(candidate[k]), values[k])
            )
        return out

    def _collides(self, pos: int) -> bool:
        return pos + 1 < len(self._hashes) and self._hashes[pos + 1] == self._hashes[pos]

    def _confirm(self, pos: int, value: str) -> int:
        i = int(self._order[pos])
        return i if self._data[self._offsets[i] : self._offsets[i + 1]].tobytes() == value.encode("utf-8") else -1

    def index(self, value: object, start: int = 0, stop: int | None = None) -> int:
        """Like ``list.index``: the position of ``value``, ``ValueError`` when absent."""
        i = self.position(value) if isinstance(value, str) else -1
        if i < 0 or i < start or (stop is not None and i >= stop):
            raise ValueError(f"{value!r} is not in the ids")
        return i

    def _decode(self, i: int) -> str:
        return self._data[self._offsets[i] : self._offsets[i + 1]].tobytes().decode("utf-8")
