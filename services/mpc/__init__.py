"""The secret-sharing engine: 3-party replicated secret sharing over Z_2^64 with fixed-point encoding.

Pure computation over numpy and `cryptography`; no file or network I/O. Every function takes the `Party`
(index, transport, PRFs) it runs as.
"""
from services.mpc.additive import reveal_additive
from services.mpc.errors import FixedPointOverflow, ProtocolError
from services.mpc.fixed_point import decode, encode
from services.mpc.party import Party
from services.mpc.prf import PartyRandomness, PartySeeds, Prf, simulated_seeds
from services.mpc.private_product import private_matvec, send_masked_vector
from services.mpc.replicated import (ReplicatedShare, add, add_public, matmul, mul, mul_public, neg, reveal_to,
                                     share_input, sub)
from services.mpc.transport import InMemoryNetwork, Transport, TransportTimeout
from services.mpc.truncation import truncate

__all__ = [
    "FixedPointOverflow", "InMemoryNetwork", "Party", "PartyRandomness", "PartySeeds", "Prf", "ProtocolError",
    "ReplicatedShare", "Transport", "TransportTimeout", "add", "add_public", "decode", "encode", "matmul", "mul",
    "mul_public", "neg", "private_matvec", "reveal_additive", "reveal_to", "send_masked_vector", "share_input",
    "simulated_seeds", "sub", "truncate",
]
