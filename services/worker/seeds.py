"""The PRF seeds of one job for this worker's party, from its X25519 key agreement with the other two workers.

The seed shared by parties i < j is HKDF-SHA256(X25519(own key, peer key), info = "cape-seed|JOB|i|j"): both sides
compute the same 32 bytes, nobody else can, and a new job gives new seeds. The party's private seed is
HKDF-SHA256(own X25519 private key, info = "cape-own-seed|JOB|i"). Everything the run draws at random comes from
these seeds, which is what lets a restarted runner replay its role and send the very same messages.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from services.mpc import PartySeeds

SEED_BYTES = 32
PARTIES = 3


def _hkdf(secret: bytes, info: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info.encode()).derive(secret)


def pair_seed(own: x25519.X25519PrivateKey, peer: x25519.X25519PublicKey, job_id: str, a: int, b: int) -> bytes:
    """The seed shared by parties `a` and `b` of `job_id` (the same whichever of the two computes it)."""
    lo, hi = sorted((a, b))
    if lo == hi:
        raise ValueError("a pair seed needs two different parties")
    return _hkdf(own.exchange(peer), f"cape-seed|{job_id}|{lo}|{hi}")


def own_seed(own: x25519.X25519PrivateKey, job_id: str, index: int) -> bytes:
    """The party's private seed for `job_id`, known to no other worker."""
    raw = own.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return _hkdf(raw, f"cape-own-seed|{job_id}|{index}")


def party_seeds(
    own: x25519.X25519PrivateKey, peers: dict[int, x25519.X25519PublicKey], job_id: str, index: int
) -> "PartySeeds":
    """The engine's `PartySeeds` of party `index`: `next` shared with (index+1)%3, `prev` with (index-1)%3."""
    from services.mpc import PartySeeds

    nxt, prev = (index + 1) % PARTIES, (index - 1) % PARTIES
    return PartySeeds(
        prev=pair_seed(own, peers[prev], job_id, index, prev),
        next=pair_seed(own, peers[nxt], job_id, index, nxt),
        own=own_seed(own, job_id, index),
    )
