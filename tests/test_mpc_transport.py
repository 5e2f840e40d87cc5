"""The in-memory transport: delivery by name, bounded waits with a useful message, byte and round counts."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from services.mpc import InMemoryNetwork, ProtocolError, Transport, TransportTimeout


def test_messages_are_delivered_by_name_in_any_order() -> None:
    network = InMemoryNetwork()
    a, b = network.transport(0), network.transport(1)
    assert isinstance(a, Transport)
    a.send(1, "first", np.arange(3, dtype=np.uint64))
    a.send(1, "second", np.arange(5, dtype=np.uint64))
    assert b.receive(0, "second").tolist() == [0, 1, 2, 3, 4]
    assert b.receive(0, "first").tolist() == [0, 1, 2]
    assert network.bytes_sent == [64, 0, 0] and network.messages_sent == [2, 0, 0]


def test_a_receive_waits_for_the_sender() -> None:
    network = InMemoryNetwork(timeout=5.0)
    sender = threading.Timer(0.1, lambda: network.transport(2).send(0, "late", np.ones(2)))
    sender.start()
    assert network.transport(0).receive(2, "late").tolist() == [1.0, 1.0]
    sender.join()


def test_a_missing_message_times_out_with_a_message_naming_it() -> None:
    network = InMemoryNetwork(timeout=0.2)
    started = time.monotonic()
    with pytest.raises(TransportTimeout) as caught:
        network.transport(1).receive(0, "lr/v/y-r")
    assert time.monotonic() - started < 2.0
    assert "party 1" in str(caught.value) and "'lr/v/y-r'" in str(caught.value) and "party 0" in str(caught.value)
    assert isinstance(caught.value, ProtocolError)


def test_a_name_is_sent_once() -> None:
    network = InMemoryNetwork()
    network.transport(0).send(1, "x", np.zeros(1))
    with pytest.raises(ProtocolError, match="sent twice"):
        network.transport(0).send(1, "x", np.zeros(1))
    with pytest.raises(ValueError):
        network.transport(0).send(0, "self", np.zeros(1))


def test_rounds_count_flights_of_messages() -> None:
    network = InMemoryNetwork()
    p0, p1 = network.transport(0), network.transport(1)
    for k in range(4):  # one flight of four messages
        p0.send(1, f"chunk/{k}", np.zeros(2))
    p1.send(0, "reply", np.zeros(1))
    p0.receive(1, "reply")
    p0.send(1, "after", np.zeros(1))  # a new round: it follows a receive
    assert network.rounds == [2, 1, 0]
