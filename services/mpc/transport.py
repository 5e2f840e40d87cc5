"""How parties exchange named arrays: the `Transport` interface and its in-memory implementation.

The engine never opens a file or a socket: every step is handed a transport. `InMemoryNetwork` connects the
parties of one process (tests, `cape simulate`, benchmarks) and counts bytes and rounds per party; the
appliance supplies a transport over its spool and the broker.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from services.mpc.errors import ProtocolError

DEFAULT_TIMEOUT_SECONDS = 120.0


class TransportTimeout(ProtocolError):
    """A message did not arrive within the transport's bound."""


@dataclass(frozen=True)
class Expected:
    """The shape and dtype a received message must have: a peer's array of any other is refused before use (the
    engine would broadcast a wrong shape silently, e.g. an (N, 1) array added to a (d,) share is N x d)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def check(self, frm: int, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """ProtocolError unless `shape` and `dtype` are the expected ones."""
        if tuple(shape) != self.shape or np.dtype(dtype) != self.dtype:
            raise ProtocolError(f"party {frm} sent {name!r} as {np.dtype(dtype)} {tuple(shape)}, expected "
                                f"{self.dtype} {self.shape}; are all workers running the same version?")


@runtime_checkable
class Transport(Protocol):
    """Party `party`'s end of the network. Message names are unique within a run and deterministic."""

    party: int

    def send(self, to: int, name: str, array: np.ndarray) -> None:
        """Send `array` to party `to` under `name`. The caller must not modify the array afterwards."""

    def receive(self, frm: int, name: str, expected: Expected | None = None) -> np.ndarray:
        """Block until the message `name` from party `frm` arrives and return it; TransportTimeout after the bound.

        `expected`: a transport that reads messages from storage may refuse one of another shape or dtype before
        reading its data (ProtocolError); `Party.receive` checks the array it returns in any case."""


class InMemoryNetwork:
    """Mailboxes for parties running in one process (threads).

    `bytes_sent[i]` counts the array bytes party i sent; `rounds[i]` counts its communication rounds (a
    round starts with a send that follows a receive, so a stream of chunks sent without waiting is one round).
    With `record=True`, `received[i]` keeps `(frm, name, array)` for every message party i received.
    """

    def __init__(self, parties: int = 3, timeout: float = DEFAULT_TIMEOUT_SECONDS, record: bool = False) -> None:
        self.parties = parties
        self.timeout = timeout
        self.record = record
        self.bytes_sent = [0] * parties
        self.messages_sent = [0] * parties
        self.rounds = [0] * parties
        self.received: list[list[tuple[int, str, np.ndarray]]] = [[] for _ in range(parties)]
        self._mail: dict[tuple[int, int, str], np.ndarray] = {}
        self._used: set[tuple[int, int, str]] = set()
        self._waiting_since_send = [True] * parties
        self._cond = threading.Condition()

    def transport(self, party: int) -> "InMemoryTransport":
        """Party `party`'s end of this network."""
        if not 0 <= party < self.parties:
            raise ValueError(f"party must be in 0..{self.parties - 1}")
        return InMemoryTransport(self, party)

    def _send(self, frm: int, to: int, name: str, array: np.ndarray) -> None:
        if not 0 <= to < self.parties or to == frm:
            raise ValueError(f"party {frm} cannot send to party {to}")
        key = (frm, to, name)
        message = np.asarray(array)
        with self._cond:
            if key in self._used:
                raise ProtocolError(f"message {name!r} from party {frm} to party {to} was sent twice")
            self._used.add(key)
            self._mail[key] = message
            self.bytes_sent[frm] += message.nbytes
            self.messages_sent[frm] += 1
            if self._waiting_since_send[frm]:
                self.rounds[frm] += 1
                self._waiting_since_send[frm] = False
            self._cond.notify_all()

    def _receive(self, to: int, frm: int, name: str) -> np.ndarray:
        key = (frm, to, name)
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while key not in self._mail:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportTimeout(
                        f"party {to} waited {self.timeout:g} s for message {name!r} from party {frm}; "
                        f"that party has probably failed: look at its error"
                    )
                self._cond.wait(remaining)
            message = self._mail.pop(key)  # delivered once; dropping it frees the memory
            self._waiting_since_send[to] = True
            if self.record:
                self.received[to].append((frm, name, message.copy()))
        return message


class InMemoryTransport:
    """One party's end of an `InMemoryNetwork`."""

    def __init__(self, network: InMemoryNetwork, party: int) -> None:
        self.network = network
        self.party = party

    def send(self, to: int, name: str, array: np.ndarray) -> None:
        """Deliver `array` to party `to`'s mailbox under `name`."""
        self.network._send(self.party, to, name, array)

    def receive(self, frm: int, name: str, expected: Expected | None = None) -> np.ndarray:
        """Wait (up to the network's timeout) for `name` from party `frm`."""
        return self.network._receive(self.party, frm, name)
