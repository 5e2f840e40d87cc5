"""Keyed pseudorandom functions: the only source of randomness of a run.

Each stream is AES-256-CTR under a key derived from the seed and the stream's name with HMAC-SHA256
(so distinct names give independent streams and never overlap), started at a zero counter. Generation is
deterministic: the same seed and name always give the same words, which lets a restarted party replay its role.
Replicated secret sharing (Araki et al., CCS 2016, section 2.2) uses one seed per pair of parties and
derives correlated randomness, such as sharings of zero, from them without communication.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.mpc.ring import RING_DTYPE

SEED_BYTES = 32
_BLOCK = 16
_CHUNK_BYTES = 1 << 20  # AES output written 1 MiB at a time (larger chunks gain nothing, smaller lose speed)
_ZEROS = bytes(_CHUNK_BYTES)
_ZERO_NONCE = bytes(_BLOCK)


@dataclass(frozen=True)
class PartySeeds:
    """One party's seeds: `next` is shared with party (i+1)%3, `prev` with (i-1)%3, `own` is private."""

    prev: bytes
    next: bytes
    own: bytes

    def __post_init__(self) -> None:
        for field in ("prev", "next", "own"):
            value = getattr(self, field)
            if not isinstance(value, bytes) or len(value) != SEED_BYTES:
                raise ValueError(f"PartySeeds.{field} must be {SEED_BYTES} bytes")

    def __repr__(self) -> str:  # never print key material
        return "PartySeeds(<redacted>)"


def simulated_seeds(master: bytes | None = None, parties: int = 3) -> list[PartySeeds]:
    """Seeds for all parties of an in-process run (simulation and tests).

    With `master` the seeds are derived from it by HKDF-SHA256 (reproducible); without, they are fresh random.
    In the appliance each pairwise seed comes from the two workers' key agreement instead.
    """

    def derive(label: str) -> bytes:
        if master is None:
            return os.urandom(SEED_BYTES)
        return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None,
                    info=f"cape-simulated-seed|{label}".encode()).derive(master)

    pair = [derive(f"pair|{i}|{(i + 1) % parties}") for i in range(parties)]  # pair[i] shared by i and i+1
    return [PartySeeds(prev=pair[(i - 1) % parties], next=pair[i], own=derive(f"own|{i}")) for i in range(parties)]


class Prf:
    """A keyed stream generator: `words(name, count)` gives `count` pseudorandom ring elements."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a PRF seed must be {SEED_BYTES} bytes")
        self._seed = seed

    def __repr__(self) -> str:
        return "Prf(<redacted>)"

    def words(self, name: str, count: int) -> np.ndarray:
        """`count` uint64 words of the stream `name` (AES-256-CTR keystream written into a preallocated buffer)."""
        key = hmac.new(self._seed, name.encode(), hashlib.sha256).digest()
        encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_NONCE)).encryptor()
        nbytes = count * 8
        buffer = np.empty(nbytes + _BLOCK - 1, dtype=np.uint8)  # update_into needs block_size-1 spare bytes
        view = memoryview(buffer)
        for offset in range(0, nbytes, _CHUNK_BYTES):
            size = min(_CHUNK_BYTES, nbytes - offset)
            data = _ZEROS if size == _CHUNK_BYTES else _ZEROS[:size]
            encryptor.update_into(data, view[offset:offset + size + _BLOCK - 1])
        return buffer[:nbytes].view(RING_DTYPE)

    def array(self, name: str, shape: int | tuple[int, ...]) -> np.ndarray:
        """Pseudorandom ring elements of the given shape."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return self.words(name, int(np.prod(shape, dtype=np.int64))).reshape(shape)

    def uniform(self, name: str, count: int) -> np.ndarray:
        """`count` floats uniform in (0, 1) (53 random bits each, never exactly 0)."""
        return (np.ldexp((self.words(name, count) >> np.uint64(11)).astype(np.float64), -53) + 2.0**-54)

    def normal(self, name: str, count: int) -> np.ndarray:
        """`count` standard normal floats (Box-Muller on `uniform`)."""
        half = (count + 1) // 2
        u = self.uniform(name, 2 * half)
        radius = np.sqrt(-2.0 * np.log(u[:half]))
        angle = 2.0 * np.pi * u[half:]
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


class PartyRandomness:
    """Party i's three PRFs and the correlated randomness derived from them."""

    def __init__(self, index: int, seeds: PartySeeds, parties: int = 3) -> None:
        self.index = index
        self.parties = parties
        self.prev = Prf(seeds.prev)
        self.next = Prf(seeds.next)
        self.own = Prf(seeds.own)

    def shared_with(self, other: int) -> Prf:
        """The PRF this party shares with party `other` (its neighbour in the ring of parties)."""
        if other == (self.index + 1) % self.parties:
            return self.next
        if other == (self.index - 1) % self.parties:
            return self.prev
        raise ValueError(f"party {self.index} shares no seed with party {other}")

    def zero_share(self, name: str, shape: int | tuple[int, ...]) -> np.ndarray:
        """This party's share of a 3-out-of-3 sharing of zero: F_{i,i+1}(name) - F_{i-1,i}(name).

        The three shares sum to 0 mod 2^64; any two of them look uniformly random to the third party.
        """
        return self.next.array(name, shape) - self.prev.array(name, shape)
