"""OutageLog: how a program says a service keeps failing, and how long it failed once it is back (unit)."""
from __future__ import annotations

import logging

from services.worker import outage_log
from services.worker.outage_log import OutageLog


def test_an_outage_is_said_at_once_then_once_a_minute_and_its_end_by_its_failed_tries(monkeypatch, caplog):
    """The end said the time up to the try that succeeded: up to one backoff (30 s) more than the service was
    known to be away, in which it may have come back at any moment."""
    clock = [100.0]
    monkeypatch.setattr(outage_log.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.DEBUG, logger="test.outage")
    outage = OutageLog(logging.getLogger("test.outage"))
    assert outage.recovered() is None  # no outage, nothing to say
    said = []
    for at in (100.0, 130.0, 160.0, 190.0):  # four failed tries, 30 s apart
        clock[0] = at
        said.append(outage.failed("cannot reach the broker; retrying in 30 s"))
    assert said == [True, False, True, False]  # the first, then the first a minute later
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "cannot reach the broker; retrying in 30 s",
        "cannot reach the broker; retrying in 30 s (failing for 60 s, 3 tries)"]
    clock[0] = 220.0  # the next try works: the broker came back some time in the last 30 s
    assert outage.lasting == 120.0
    assert outage.recovered() == "after 4 failed tries over 90 s"
    assert outage.lasting == 0.0 and outage.recovered() is None
    clock[0] = 300.0
    outage.failed("cannot reach the broker; retrying in 1 s")
    clock[0] = 301.0
    assert outage.recovered() == "after one failed try"
