"""The ring Z_2^64 on numpy uint64.

numpy's unsigned integer arithmetic on arrays wraps around modulo 2^64, which is exactly ring arithmetic;
a value is read as a signed (two's-complement) integer by viewing it as int64.
"""
from __future__ import annotations

import numpy as np

RING_DTYPE = np.uint64
RING_BITS = 64


def as_ring(values: np.ndarray) -> np.ndarray:
    """Return `values` (any integer dtype) as ring elements (uint64), reinterpreting signed integers."""
    arr = np.asarray(values)
    if arr.dtype == RING_DTYPE:
        return arr
    if arr.dtype == np.int64:
        return arr.view(RING_DTYPE)
    return arr.astype(np.int64).view(RING_DTYPE)


def to_signed(values: np.ndarray) -> np.ndarray:
    """View ring elements as signed 64-bit integers (two's complement), without copying."""
    return np.asarray(values, dtype=RING_DTYPE).view(np.int64)


def zeros(shape: int | tuple[int, ...]) -> np.ndarray:
    """A ring array of zeros."""
    return np.zeros(shape, dtype=RING_DTYPE)


def arithmetic_shift(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed right shift (floor division by 2^bits of the two's-complement value), as ring elements."""
    return (to_signed(values) >> np.int64(bits)).view(RING_DTYPE)


def vec_mat(vector: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """vector @ matrix in the ring; einsum's integer loop is ~4x faster here than matmul's for (n,)@(n, m)."""
    return np.einsum("i,ij->j", vector, matrix)
