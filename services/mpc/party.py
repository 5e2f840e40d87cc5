"""A party of a run: its index, its transport and its randomness, passed to every protocol function."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.mpc.errors import ProtocolError
from services.mpc.prf import PartyRandomness, PartySeeds
from services.mpc.ring import RING_DTYPE
from services.mpc.transport import Expected, Transport

PARTIES = 3


@dataclass
class Party:
    """Party `index` (0, 1 or 2). Build it with `Party.create(index, transport, seeds)`."""

    index: int
    transport: Transport
    randomness: PartyRandomness
    _names: set[str] = field(default_factory=set, repr=False)

    @classmethod
    def create(cls, index: int, transport: Transport, seeds: PartySeeds) -> "Party":
        """Check that the index matches the transport and build the party's PRFs."""
        if index not in range(PARTIES):
            raise ProtocolError(f"party index must be 0, 1 or 2, not {index}")
        if getattr(transport, "party", index) != index:
            raise ProtocolError(f"the transport belongs to party {transport.party}, not to party {index}")
        return cls(index, transport, PartyRandomness(index, seeds, PARTIES))

    @property
    def next(self) -> int:
        """The index of the next party, (i+1) mod 3."""
        return (self.index + 1) % PARTIES

    @property
    def prev(self) -> int:
        """The index of the previous party, (i-1) mod 3."""
        return (self.index - 1) % PARTIES

    def claim(self, name: str) -> str:
        """Register a step name; reusing one would reuse randomness or message names, so it is refused."""
        if name in self._names:
            raise ProtocolError(f"step name {name!r} used twice in one run; every step needs its own name")
        self._names.add(name)
        return name

    def send(self, to: int, name: str, array: np.ndarray) -> None:
        """Send an array to party `to`."""
        self.transport.send(to, name, np.ascontiguousarray(array))

    def receive(self, frm: int, name: str, shape: tuple[int, ...], dtype: np.dtype | type = RING_DTYPE) -> np.ndarray:
        """Receive an array from party `frm`; ProtocolError unless it has this shape and dtype (both are public)."""
        expected = Expected(tuple(int(n) for n in shape), np.dtype(dtype))
        array = self.transport.receive(frm, name, expected)
        expected.check(frm, name, array.shape, array.dtype)
        return array
