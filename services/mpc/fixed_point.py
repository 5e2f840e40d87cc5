"""Signed fixed-point encoding of float64 values into Z_2^64.

A real x is stored as round(x * 2^frac_bits) mod 2^64; the representable range is |x| < 2^(63 - frac_bits).
The fractional bits may be negative (a coarse scale for very large values). Encoding rounds to nearest, so the
encoding error is at most 2^-(frac_bits+1) per value.
"""
from __future__ import annotations

import numpy as np

from services.mpc.errors import FixedPointOverflow
from services.mpc.ring import RING_DTYPE, to_signed

_LIMIT = float(2**63)


def encode(values: np.ndarray, frac_bits: int, *, what: str = "value") -> np.ndarray:
    """Encode floats as ring elements with `frac_bits` fractional bits; raise FixedPointOverflow if out of range.

    `what` names the quantity in the error message (never the value itself).
    """
    arr = np.asarray(values, dtype=np.float64)
    scaled = np.ldexp(arr, frac_bits)
    np.rint(scaled, out=scaled)
    if scaled.size and not np.all(np.abs(scaled) < _LIMIT):
        raise FixedPointOverflow(
            f"{what} does not fit the 64-bit fixed-point range with {frac_bits} fractional bits "
            f"(the limit is 2^{63 - frac_bits}); rescale it or use fewer fractional bits"
        )
    return scaled.astype(np.int64).view(RING_DTYPE)


def encode_scaled(scaled: np.ndarray) -> np.ndarray:
    """Round values that are already multiplied by their scale and return them as ring elements.

    For hot loops whose scale is folded into a matrix product; the caller guarantees |scaled| < 2^63.
    """
    np.rint(scaled, out=scaled)
    return scaled.astype(np.int64).view(RING_DTYPE)


def decode(ring_values: np.ndarray, frac_bits: int) -> np.ndarray:
    """Decode ring elements (two's complement) with `frac_bits` fractional bits into float64."""
    return np.ldexp(to_signed(ring_values).astype(np.float64), -frac_bits)
