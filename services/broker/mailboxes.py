"""Wake-ups for long polls: one asyncio event per mailbox, set when a message arrives there."""
from __future__ import annotations

import asyncio


class MailboxSignals:
    """Per-(job, seat) events on the server's event loop; a waiting poll returns as soon as a put lands."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], asyncio.Event] = {}

    def event(self, job_id: str, seat: str) -> asyncio.Event:
        """The event the next arrival in this mailbox will set (take it *before* checking the mailbox)."""
        return self._events.setdefault((job_id, seat), asyncio.Event())

    def notify(self, job_id: str, seat: str) -> None:
        # Popping gives later waiters a fresh event, so nothing stays set and no waiter spins.
        event = self._events.pop((job_id, seat), None)
        if event is not None:
            event.set()
