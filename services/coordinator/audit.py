"""What an operator needs to answer "who did this?": one `cape.audit` log line per change to who may do what
(members and roles, tokens issued and revoked, a worker's keys, projects' organizations and helper, job approvals,
rejections and stops, deletions), and requests to the coordinator or the broker refused for their token, counted
per client address and said at most once a minute. Ids, labels and emails only: never a token's secret.
(`cape-server admin` commands act on the database directly: services/server/admin_audit.py records them.)"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter

from services.coordinator.identity import Principal

log = logging.getLogger("cape.audit")
REFUSALS_SAID_EVERY_SECONDS = 60.0


def actor(p: Principal) -> str:
    """Who made a request, as a log line names them."""
    if p.kind == "user":
        return f"{p.email} (token {p.token_id})"
    return f"the worker of organization {p.org_id} (token {p.token_id})"


def record(p: Principal, action: str, *args: object) -> None:
    """One line: `<actor> <action>`, `action` a %-format over `args`."""
    log.info("%s " + action, actor(p), *args)


class RefusedTokens:
    """Requests answered 401 (no token, a malformed, unknown or revoked one), by client address: the first after a
    quiet minute is said at once, the rest are added up and said by `flush` (the server's sweep calls it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._said_at = -REFUSALS_SAID_EVERY_SECONDS

    def note(self, client: str) -> None:
        with self._lock:
            self._counts[client] += 1
        self.flush()

    def flush(self, final: bool = False) -> None:
        """Say the refusals counted since the last line, if a minute has passed (or `final`: the server stops)."""
        with self._lock:
            now = time.monotonic()
            if not self._counts or (now - self._said_at < REFUSALS_SAID_EVERY_SECONDS and not final):
                return
            counts, self._counts, self._said_at = self._counts, Counter(), now
        log.warning("%d request(s) refused for their token (missing, unknown or revoked) since the last such line: "
                    "%s", sum(counts.values()), ", ".join(f"{client} x{n}" for client, n in counts.most_common(10)))
