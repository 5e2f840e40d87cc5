"""How a program says that a service it needs (the coordinator, the broker) keeps failing: the first failure at
once, then at most once per `every` seconds while it lasts, with how long and how many tries, and how long it lasted
once it is over. One line per retry made an outage of hours hundreds of lines per worker, the first and most
telling one buried among them (and an alarm on the count of warnings firing all along)."""
from __future__ import annotations

import logging
import re
import time

SAID_EVERY_SECONDS = 60.0
# A service away this long makes `cape-worker health` fail: a brief outage is no reason for an orchestrator to
# act, but a coordinator that moved (a new URL) leaves a worker idle for weeks while it looks healthy.
UNHEALTHY_AFTER_SECONDS = 3600.0


def without_numbers(text: str) -> str:
    """`text` with its numbers as `#`: a reason that only counts on (seconds ago, MiB free) is no new reason."""
    return re.sub(r"\d+(?:\.\d+)?", "#", text)


class OutageLog:
    """The log lines of one outage after another of a service, in `log`."""

    def __init__(self, log: logging.Logger, every: float = SAID_EVERY_SECONDS, level: int = logging.WARNING) -> None:
        self.log = log
        self.every = every
        self.level = level
        self.failures = 0
        self._since = self._said_at = self._last = 0.0
        self._reason: str | None = None

    def failed(self, message: str, reason: str | None = None) -> bool:
        """Note one failed try; returns True if it was said (the first, the first for `every` seconds, or the first
        with another `reason`: the failure's cause without the retry's delay, when it can change during an outage)."""
        now = self._last = time.monotonic()
        self.failures += 1
        if self.failures == 1:
            self._since = now
        new_reason, self._reason = reason != self._reason, reason
        if self.failures > 1 and not new_reason and now - self._said_at < self.every:
            self.log.debug("%s", message)
            return False
        self._said_at = now
        lasting = "" if self.failures == 1 else f" (failing for {now - self._since:.0f} s, {self.failures} tries)"
        self.log.log(self.level, "%s%s", message, lasting)
        return True

    @property
    def lasting(self) -> float:
        """Seconds since the current outage began (0 when there is none)."""
        return time.monotonic() - self._since if self.failures else 0.0

    def recovered(self) -> str | None:
        """End the outage; what is known of how long it lasted, in words (None if there was none): its failed tries
        and the time between the first and the last. Up to the try that succeeded, it overstated the outage by up to
        one backoff (30 s), a pause in which the service may have come back at any time."""
        if not self.failures:
            return None
        tries, span = self.failures, self._last - self._since
        self.failures = 0
        self._reason = None
        return "after one failed try" if tries == 1 else f"after {tries} failed tries over {span:.0f} s"
