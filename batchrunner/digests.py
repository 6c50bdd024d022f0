"""Compact tables keyed by 8-byte digests of custom_ids: memory flat in the jobs.

A Python set of 8-byte `bytes` costs about 75 bytes an id, a dict about 100:
at a million jobs that is most of the process. These tables keep the digests
as unsigned 64-bit integers in `array('Q')` with open addressing and linear
probing (Knuth, TAOCP 6.4, algorithm L), at most 70% full: about 11 bytes an
id for a set, 23 for a map to one 64-bit value. When the number of ids is
known in advance (the lines of a file) the table is sized once; otherwise it
doubles as it fills.

Digests come from blake2b and are uniform, so the slot is the digest modulo
the capacity. Zero marks an empty slot; a digest of zero is stored as one
(another collision among 2^64 values, no likelier than any other).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator

MAX_LOAD = 0.7


def id_digest(custom_id: str) -> int:
    """The 64-bit digest that stands for a custom_id (never 0)."""
    digest = int.from_bytes(hashlib.blake2b(custom_id.encode(), digest_size=8).digest(), "big")
    return digest or 1


def _zeros(capacity: int) -> array[int]:
    return array("Q", [0]) * capacity  # sized exactly (frombytes over-allocates)


class DigestSet:
    """A set of custom_id digests."""

    __slots__ = ("_capacity", "_keys", "_size")

    def __init__(self, expected: int = 0) -> None:
        self._capacity = max(16, int(expected / MAX_LOAD) + 1)
        self._keys = _zeros(self._capacity)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, custom_id: str) -> bool:
        digest = id_digest(custom_id)
        return self._keys[self._slot(digest)] == digest

    def add(self, custom_id: str) -> bool:
        """Add a custom_id; False when it was there already."""
        digest = id_digest(custom_id)
        slot = self._slot(digest)
        if self._keys[slot] == digest:
            return False
        self._insert(slot, digest)
        return True

    def _slot(self, digest: int) -> int:
        """The slot holding `digest`, or the empty slot where it would go."""
        keys, capacity = self._keys, self._capacity
        slot = digest % capacity
        while True:
            key = keys[slot]
            if key == digest or key == 0:
                return slot
            slot += 1
            if slot == capacity:
                slot = 0

    def _insert(self, slot: int, digest: int) -> None:
        self._keys[slot] = digest
        self._size += 1
        if self._size > MAX_LOAD * self._capacity:
            self._grow()

    def _grow(self) -> None:
        old = self._keys
        self._capacity *= 2
        self._keys = _zeros(self._capacity)
        for digest in old:
            if digest:
                self._keys[self._slot(digest)] = digest


class DigestMap(DigestSet):
    """custom_id digests to one unsigned 64-bit value each."""

    __slots__ = ("_values",)

    def __init__(self, expected: int = 0) -> None:
        super().__init__(expected)
        self._values = _zeros(self._capacity)

    def get(self, custom_id: str) -> int | None:
        if not self._size:  # empty (a first run's prior results): no digest to compute
            return None
        digest = id_digest(custom_id)
        slot = self._slot(digest)
        return self._values[slot] if self._keys[slot] == digest else None

    def put(self, custom_id: str, value: int) -> bool:
        """Set the value of a custom_id; False when it had one already (replaced)."""
        digest = id_digest(custom_id)
        slot = self._slot(digest)
        if self._keys[slot] == digest:
            self._values[slot] = value
            return False
        self._values[slot] = value
        self._insert(slot, digest)
        return True

    def values(self) -> Iterator[int]:
        keys = self._keys
        return (value for index, value in enumerate(self._values) if keys[index])

    def _grow(self) -> None:
        old_keys, old_values = self._keys, self._values
        self._capacity *= 2
        self._keys, self._values = _zeros(self._capacity), _zeros(self._capacity)
        for digest, value in zip(old_keys, old_values, strict=True):
            if digest:
                slot = self._slot(digest)
                self._keys[slot] = digest
                self._values[slot] = value
