"""Opening a 3-out-of-3 additive sharing to one party, re-randomized first.

Each party adds its share of a fresh sharing of zero (from the pairwise PRFs, Araki et al. CCS 2016,
section 2.2) before sending, so the two shares the receiving party gets are uniformly random given their sum:
it learns the opened value and nothing about how it was split (which could otherwise leak the inputs of a
`private_product`). One round, one message from each of the two other parties.
"""
from __future__ import annotations

import numpy as np

from services.mpc.party import Party
from services.mpc.ring import as_ring


def reveal_additive(party: Party, name: str, share: np.ndarray, to: int) -> np.ndarray | None:
    """Open the additively shared value to party `to`; the others send their masked share and get None."""
    party.claim(name)
    masked = as_ring(share) + party.randomness.zero_share(name, np.shape(share))
    if party.index != to:
        party.send(to, f"{name}/{party.index}", masked)
        return None
    for other in range(3):
        if other != to:
            masked = masked + party.receive(other, f"{name}/{other}", masked.shape)
    return masked
