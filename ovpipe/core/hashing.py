"""Hashing that decides identity and randomness: every random choice in the pipeline is a
function of (sample_id, seed), never of the order in which rows arrive.

``sample_id`` is the xxh3-64 of the image bytes (16 hex digits); ``sample_hash`` is the same 64
bits as a uint64 column, so hashing is vectorised. ``splitmix64`` mixes those bits with a seed.
"""

from __future__ import annotations

import numpy as np
import xxhash

GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment (2**64 / golden ratio)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-avalanched 64-bit mix of uint64 values (vectorised)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _M1
        x = x ^ (x >> np.uint64(27))
        x = x * _M2
        return x ^ (x >> np.uint64(31))


def seeded_mix(x: np.ndarray, seed: int) -> np.ndarray:
    """A well-mixed 64-bit hash of (x, seed): one SplitMix64 step from state x + GOLDEN * (seed + 1)."""
    with np.errstate(over="ignore"):
        return splitmix64(np.asarray(x).astype(np.uint64) + np.uint64((GOLDEN * (seed + 1)) & 0xFFFFFFFFFFFFFFFF))


def text_hash(text: str) -> int:
    """xxh3-64 of a string's UTF-8 bytes (a sample_hash from a sample_id, caption keys)."""
    return xxhash.xxh3_64_intdigest(text.encode("utf-8"))
