"""Wake-ups for long polls: one asyncio event per mailbox, set when a message arrives there."""
from __future__ import annotations

import asyncio


class MailboxSignals:
    """Per-(job, seat) events on the server's event loop; a waiting poll returns as soon as a put lands.

    `close()` (server shutdown) wakes every waiting poll and makes new ones return at once, so a stopping
    server does not sit out its graceful-shutdown period on parked long polls.
    """

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], asyncio.Event] = {}
        self.closing = False

    def event(self, job_id: str, seat: str) -> asyncio.Event:
        """The event the next arrival in this mailbox will set (take it *before* checking the mailbox)."""
        event = self._events.setdefault((job_id, seat), asyncio.Event())
        if self.closing:
            event.set()
        return event

    def notify(self, job_id: str, seat: str) -> None:
        # Popping gives later waiters a fresh event, so nothing stays set and no waiter spins.
        event = self._events.pop((job_id, seat), None)
        if event is not None:
            event.set()

    def close(self) -> None:
        """Wake all waiters for good (call on the event loop's thread)."""
        self.closing = True
        for event in self._events.values():
            event.set()
        self._events.clear()
