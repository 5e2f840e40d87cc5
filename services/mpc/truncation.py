"""Truncation of replicated shares by a public number of bits (fixed-point rescaling after a product).

ABY3 (Mohassel and Rindal, CCS 2018), section 5.1.1, protocol Pi_trunc1, built on the two-party local
truncation of SecureML (Mohassel and Zhang, S&P 2017, section 4.1, Theorem 1). Parties 0 and 1 view x as a
two-party sharing y0 + y1 with y0 = x_0 + x_1 (held by party 0) and y1 = x_2 (held by parties 1 and 2), shift
their halves locally, and party 0 re-randomizes its half with the PRF it shares with party 2.

Error bound: if |x| < 2^l_x, then with probability at least 1 - 2^(l_x + 1 - 64) the result decodes to
x / 2^bits with an absolute error of at most one unit in the last place (2^-frac_bits after rescaling);
otherwise (probability below 2^(l_x + 1 - 64), e.g. 2^-23 for l_x = 40) it is wrong by about 2^(64 - bits).
Keep values well below 2^62 before truncating.
"""
from __future__ import annotations

from services.mpc.party import Party
from services.mpc.replicated import ReplicatedShare
from services.mpc.ring import arithmetic_shift


def truncate(party: Party, name: str, x: ReplicatedShare, bits: int) -> ReplicatedShare:
    """Shares of x / 2^bits (rounded, see the module's error bound); one message from party 0 to party 1."""
    party.claim(name)
    i = party.index
    if i == 0:
        t0 = arithmetic_shift(x.first + x.second, bits)
        r = party.randomness.prev.array(name, t0.shape)  # shared with party 2
        x1 = t0 - r
        party.send(1, name, x1)
        return ReplicatedShare(r, x1)
    if i == 1:
        t1 = -arithmetic_shift(-x.second, bits)
        return ReplicatedShare(party.receive(0, name, t1.shape), t1)
    t1 = -arithmetic_shift(-x.first, bits)
    return ReplicatedShare(t1, party.randomness.next.array(name, t1.shape))
