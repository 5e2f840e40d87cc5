"""Wake-ups for long polls: one asyncio event per mailbox being waited on, set when a message arrives there."""
from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class MailboxSignals:
    """Per-(job, seat) events on the server's event loop; a waiting poll returns as soon as a put lands.

    An event exists only while a poll watches its mailbox, so a server that saw many jobs keeps none of theirs.
    `close()` (server shutdown) wakes every waiting poll and makes new ones return at once, so a stopping
    server does not sit out its graceful-shutdown period on parked long polls.
    """

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], asyncio.Event] = {}
        self._watchers: Counter[tuple[str, str]] = Counter()
        self.closing = False

    @contextmanager
    def watching(self, mailboxes: list[tuple[str, str]]) -> Iterator[list[asyncio.Event]]:
        """The events the next arrival in each (job, seat) mailbox will set: take them *before* looking in the
        mailboxes, and wait inside the block."""
        events = []
        for key in mailboxes:
            events.append(self._events.setdefault(key, asyncio.Event()))
            self._watchers[key] += 1
            if self.closing:
                events[-1].set()
        try:
            yield events
        finally:
            for key in mailboxes:
                self._watchers[key] -= 1
                if self._watchers[key] <= 0:  # nobody waits on this mailbox: no event to keep
                    del self._watchers[key]
                    self._events.pop(key, None)

    def notify(self, job_id: str, seat: str) -> None:
        # Popping gives later waiters a fresh event, so nothing stays set and no waiter spins.
        event = self._events.pop((job_id, seat), None)
        if event is not None:
            event.set()

    def watched(self) -> int:
        """How many mailboxes have an event now (for tests: none once no poll waits)."""
        return len(self._events)

    def close(self) -> None:
        """Wake all waiters for good (call on the event loop's thread)."""
        self.closing = True
        for event in self._events.values():
            event.set()
        self._events.clear()
