"""What an operator needs to answer "who did this?": one `cape.audit` log line per change to who may do what
(members and roles, tokens issued and revoked, a worker's keys, projects' organizations and helper, job approvals,
rejections and stops, deletions), and requests to the coordinator or the broker refused for their token (counted
per client address) or as not allowed to their caller (per token and code), each said at most once a minute. Ids,
labels and emails only: never a token's secret. (`cape-server admin` commands act on the database directly:
services/server/admin_audit.py records them.)"""
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


class Refusals:
    """Refused requests of one kind, by who made them: the first after a quiet minute is said at once, the rest are
    added up and said by `flush` (the server's sweep calls it)."""

    def __init__(self, refused_for: str) -> None:
        self.refused_for = refused_for
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._said_at = -REFUSALS_SAID_EVERY_SECONDS

    def note(self, who: str) -> None:
        with self._lock:
            self._counts[who] += 1
        self.flush()

    def flush(self, final: bool = False) -> None:
        """Say the refusals counted since the last line, if a minute has passed (or `final`: the server stops)."""
        with self._lock:
            now = time.monotonic()
            if not self._counts or (now - self._said_at < REFUSALS_SAID_EVERY_SECONDS and not final):
                return
            counts, self._counts, self._said_at = self._counts, Counter(), now
        log.warning("%d request(s) refused %s since the last such line: %s", sum(counts.values()), self.refused_for,
                    ", ".join(f"{who} x{n}" for who, n in counts.most_common(10)))


class RefusedTokens(Refusals):
    """Requests answered 401 (no token, a malformed, unknown or revoked one), by client address."""

    def __init__(self) -> None:
        super().__init__("for their token (missing, unknown or revoked)")


class RefusedActions(Refusals):
    """Requests answered 403 (a valid token that may not do it: another organization's project, a role too low),
    by who made them and the refusal's code: an organization probing others' projects left no trace before."""

    def __init__(self) -> None:
        super().__init__("as not allowed to the caller (403)")

    def note_principal(self, p: Principal, code: str) -> None:
        self.note(f"{actor(p)} {code}")
