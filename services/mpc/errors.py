"""Typed errors of the secret-sharing engine.

Messages never contain data values, shares or keys: they name the step, the party and what to do.
"""


class ProtocolError(Exception):
    """A secure-computation run cannot continue (bad input to a step, a peer stopped, a timeout)."""


class FixedPointOverflow(ProtocolError):
    """A value does not fit the fixed-point range of the ring at the requested precision."""
