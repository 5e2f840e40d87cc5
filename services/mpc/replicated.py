"""3-party replicated secret sharing over Z_2^64 (semi-honest, honest majority).

Araki, Furukawa, Lindell, Nof, Ohara, "High-throughput semi-honest secure three-party computation with an
honest majority" (CCS 2016), section 2: x = x_0 + x_1 + x_2 and party i holds the pair (x_i, x_{i+1}); any
one party's pair is uniformly random, any two parties together can reconstruct x. Multiplication computes a
3-out-of-3 additive sharing locally (masked by a sharing of zero from the pairwise PRFs) and reshares it in
one round (each party sends one share to its predecessor). Written in the manner of CrypTen's replicated.py:
plain functions, the party (transport and randomness) passed in.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.mpc.party import Party
from services.mpc.ring import RING_DTYPE, as_ring


@dataclass(frozen=True)
class ReplicatedShare:
    """Party i's pair (x_i, x_{i+1}) of a replicated sharing of an array of ring elements."""

    first: np.ndarray
    second: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.first.shape


def share_input(party: Party, name: str, owner: int, value: np.ndarray | None,
                shape: tuple[int, ...]) -> ReplicatedShare:
    """Secret-share `owner`'s ring array (section 2.2, input sharing with PRF-derived shares).

    x_o and x_{o+1} come from the PRFs the owner shares with o-1 and o+1; the owner sends only
    x_{o+2} = x - x_o - x_{o+1} to its two peers. Other parties pass `value=None`.
    """
    party.claim(name)
    o, i = owner, party.index
    if i == o:
        if value is None:
            raise ValueError("the owner must provide the value to share")
        x = as_ring(value)
        if x.shape != tuple(shape):
            raise ValueError(f"value has shape {x.shape}, expected {tuple(shape)}")
        x_o = party.randomness.prev.array(f"{name}/x0", shape)
        x_o1 = party.randomness.next.array(f"{name}/x1", shape)
        x_o2 = x - x_o - x_o1
        party.send((o + 1) % 3, f"{name}/x2", x_o2)
        party.send((o + 2) % 3, f"{name}/x2", x_o2)
        return ReplicatedShare(x_o, x_o1)
    if i == (o + 1) % 3:
        x_o1 = party.randomness.prev.array(f"{name}/x1", shape)
        return ReplicatedShare(x_o1, party.receive(o, f"{name}/x2", tuple(shape)))
    x_o = party.randomness.next.array(f"{name}/x0", shape)
    return ReplicatedShare(party.receive(o, f"{name}/x2", tuple(shape)), x_o)


def reveal_to(party: Party, name: str, share: ReplicatedShare, to: int) -> np.ndarray | None:
    """Open the shared value to party `to` only: it receives the one share it lacks, from party to+1.

    The other two parties receive nothing and return None.
    """
    party.claim(name)
    if party.index == to:
        return share.first + share.second + party.receive((to + 1) % 3, name, share.first.shape)
    if party.index == (to + 1) % 3:
        party.send(to, name, share.second)
    return None


def add(x: ReplicatedShare, y: ReplicatedShare) -> ReplicatedShare:
    """Shares of x + y (local)."""
    return ReplicatedShare(x.first + y.first, x.second + y.second)


def sub(x: ReplicatedShare, y: ReplicatedShare) -> ReplicatedShare:
    """Shares of x - y (local)."""
    return ReplicatedShare(x.first - y.first, x.second - y.second)


def neg(x: ReplicatedShare) -> ReplicatedShare:
    """Shares of -x (local)."""
    return ReplicatedShare(-x.first, -x.second)


def add_public(party: Party, x: ReplicatedShare, constant: np.ndarray | int) -> ReplicatedShare:
    """Shares of x + c for a public ring constant c: added to x_0, held by parties 0 (first) and 2 (second)."""
    c = as_ring(np.asarray(constant))
    if party.index == 0:
        return ReplicatedShare(x.first + c, x.second.copy())
    if party.index == 2:
        return ReplicatedShare(x.first.copy(), x.second + c)
    return x


def mul_public(x: ReplicatedShare, constant: np.ndarray | int) -> ReplicatedShare:
    """Shares of c * x for a public ring constant c (local)."""
    c = as_ring(np.asarray(constant))
    return ReplicatedShare(x.first * c, x.second * c)


def _reshare(party: Party, name: str, additive: np.ndarray) -> ReplicatedShare:
    """Turn a 3-out-of-3 additive share z_i into replicated (z_i, z_{i+1}): send z_i to party i-1."""
    party.send(party.prev, name, additive)
    return ReplicatedShare(additive, party.receive(party.next, name, additive.shape))


def mul(party: Party, name: str, x: ReplicatedShare, y: ReplicatedShare) -> ReplicatedShare:
    """Shares of the elementwise product x*y (section 2.3): one round, one share-sized message per party."""
    party.claim(name)
    z = x.first * y.first + x.first * y.second + x.second * y.first
    z += party.randomness.zero_share(name, z.shape)
    return _reshare(party, name, z)


def matmul(party: Party, name: str, x: ReplicatedShare, y: ReplicatedShare) -> ReplicatedShare:
    """Shares of the matrix product x @ y: the same three cross terms as `mul`, then one resharing round."""
    party.claim(name)
    z = x.first @ y.first + x.first @ y.second + x.second @ y.first
    z = np.asarray(z, dtype=RING_DTYPE)
    z += party.randomness.zero_share(name, z.shape)
    return _reshare(party, name, z)
