"""Still-preparing keep-alives: how a seat that is late for its first message tells its partners it is alive.

A seat can be late for longer than the job's timeout and still be fine: queued at its worker for one of the runner's
job slots (job_slots.py), or loading a large dataview from a slow store (dataview.py). Its partners, already
computing, would give the job up (spool_transport.py; the job cannot resume). So from `FIRST_AFTER_SECONDS` after
the runner takes its seat until its first protocol message goes out (after a restart: its first message not sent
before), the runner seals a keep-alive to each partner seat every `interval_for(timeout)`.

A keep-alive is a message like any other: sealed to the recipient and signed by the sender, bound to the job, both
seats and its name (sealing.py), relayed by the broker under the sender's seat and verified by the messenger into
the inbox, where it stays until the job ends. So a forged, altered, replayed or misaddressed one is dropped and
logged like any message. Its name is `<seat>.preparing.<n>`, a name no engine message has (`wire_name`), with
numbers that go on from those in the outbox, so a restarted runner never reuses one (the broker writes a name once).
Its plaintext is only the seat's phase, `{"phase": "loading its data: 120 of 253 MiB"}`, as its seat shows it at
the coordinator: no data value. A partner's wait goes on while they come (partner_wait.py), and says why.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass

from services.worker.job_spec import JobSpec
from services.worker.keys import WorkerKeys
from services.worker.sealing import MessageAddress, SealedMessage
from services.worker.spool import Spool, atomic_writer

log = logging.getLogger("cape.runner")
WORD = "preparing"
NAME_PATTERN = re.compile(rf"(?P<seat>[a-z][a-z_]{{0,31}})\.{WORD}\.(?P<number>[0-9]{{1,12}})")
MAX_INTERVAL_SECONDS = 60.0
# A seat that sends its first message this soon after taking its seat sends no keep-alive: the usual job, with its
# data at hand and a slot free, costs no extra message.
FIRST_AFTER_SECONDS = 1.0
PHASE_MAX_CHARS = 200
# A keep-alive's plaintext is `{"phase": ...}` of at most PHASE_MAX_CHARS characters (each at most 12 bytes as JSON
# escapes it); its sealed form adds a header and one chunk's length and tag. Anything larger is not a keep-alive our
# workers send: the messenger refuses it unread and the runner never reads more than this (a partner's 300 MiB one
# took the runner to 3 GiB, enough to kill it, and its replay after the restart read it again).
MAX_PLAINTEXT_BYTES = 4096
MAX_SEALED_BYTES = MAX_PLAINTEXT_BYTES + 1024
IDLE_SECONDS = 1.0  # the sending thread looks at the stop flag at least this often


def interval_for(timeout: float) -> float:
    """Seconds between keep-alives for a job with this timeout: a partner's wait sees about four of them."""
    return min(MAX_INTERVAL_SECONDS, timeout / 4)


def keepalive_name(seat: str, number: int) -> str:
    """The broker/inbox name of `seat`'s keep-alive number `number`."""
    return f"{seat}.{WORD}.{number}"


def is_keepalive_name(name: str) -> bool:
    """True for a keep-alive's name (from any seat)."""
    return NAME_PATTERN.fullmatch(name) is not None


def _number(name: str, seat: str) -> int | None:
    match = NAME_PATTERN.fullmatch(name)
    return int(match["number"]) if match and match["seat"] == seat else None


def _clean(phase: object) -> str | None:
    """A phase from a partner as this worker may log and show it: printable, one line, bounded."""
    if not isinstance(phase, str):
        return None
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in phase).split())
    return text[:PHASE_MAX_CHARS] or None


class PartnerKeepAlives:
    """The keep-alives one partner seat sent this worker in a job, as the messenger placed them in the inbox. Those
    there when it is made are old news: `fresh()` gives those that came since it was made, or since its last call."""

    def __init__(self, spool: Spool, job_id: str, seat: str) -> None:
        self.spool = spool
        self.job_id = job_id
        self.seat = seat
        self.phase: str | None = None  # the latest fresh one's, once one came
        self.heard = False  # whether any fresh one came
        self._seen = self._names()

    def fresh(self) -> list[str]:
        """Names of the keep-alives that came since the last look; reads the newest one's phase."""
        names = self._names()
        fresh = sorted(names - self._seen, key=lambda name: _number(name, self.seat) or 0)
        self._seen = names
        if fresh:
            self.heard = True
            self.phase = self._phase(fresh[-1]) or self.phase
        return fresh

    def _names(self) -> set[str]:
        return {name for name in self.spool.inbox_names(self.job_id) if _number(name, self.seat) is not None}

    def _phase(self, name: str) -> str | None:
        try:
            with open(self.spool.inbox_path(self.job_id, name), "rb") as handle:
                body = handle.read(MAX_PLAINTEXT_BYTES + 1)
            if len(body) > MAX_PLAINTEXT_BYTES:  # never read whole: a partner's phase is short, or it is not one
                return None
            return _clean(json.loads(body).get("phase"))
        except (OSError, ValueError, AttributeError):  # genuine (it verified) but unreadable: alive all the same
            return None


@dataclass
class _Preparing:
    """A job whose seat has sent no protocol message yet."""

    spec: JobSpec
    phase: str
    due: float  # when its next keep-alive goes (time.monotonic())
    number: int | None = None  # the next keep-alive's number, found in the outbox when the first one goes
    ended: bool = False


class KeepAlives:
    """The runner's keep-alives for its jobs that are still preparing: one thread seals them for all the jobs (one
    per job would be 64 threads with a long queue), and ends when none is left."""

    def __init__(self, spool: Spool, keys: WorkerKeys, stop: threading.Event) -> None:
        self.spool = spool
        self.keys = keys
        self.stop = stop
        self.sent = 0
        self._cond = threading.Condition()
        self._jobs: dict[str, _Preparing] = {}
        self._thread: threading.Thread | None = None
        self._refused: set[str] = set()  # jobs whose keep-alive the spool refused, said once each

    def begin(self, spec: JobSpec, phase: str) -> None:
        """The runner took the job's seat: keep-alives go from `FIRST_AFTER_SECONDS` on, until `end`."""
        first = min(FIRST_AFTER_SECONDS, interval_for(spec.timeout))
        with self._cond:
            self._jobs[spec.id] = _Preparing(spec, phase, time.monotonic() + first)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="keepalives", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def phase(self, job_id: str, text: str) -> None:
        """What the job's seat does now, for its next keep-alive (as its seat says it at the coordinator)."""
        with self._cond:
            if job_id in self._jobs:
                self._jobs[job_id].phase = text

    def end(self, job_id: str) -> None:
        """No more keep-alives for the job (its first protocol message goes out, or it ended here). It never waits
        for one being written (an fsync on a busy disk could hold a stopping runner's job past its 2 s): that one
        may still land, and goes like any message left in the outbox of a job that is done or ended."""
        with self._cond:
            preparing = self._jobs.pop(job_id, None)
            if preparing is not None:
                preparing.ended = True

    def _run(self) -> None:
        while not self.stop.is_set():
            with self._cond:
                if not self._jobs:
                    self._thread = None  # the next `begin` starts another
                    return
                now = time.monotonic()
                soonest = min(p.due for p in self._jobs.values())
                if soonest > now:
                    self._cond.wait(min(soonest - now, IDLE_SECONDS))
                    continue
                due = [p for p in self._jobs.values() if p.due <= now]
                for preparing in due:
                    preparing.due = now + interval_for(preparing.spec.timeout)
            for preparing in due:  # sealed and written outside the lock: `begin`, `phase` and `end` never wait
                if self.stop.is_set():
                    break
                self._send(preparing)
        with self._cond:
            self._thread = None

    def _send(self, preparing: _Preparing) -> None:
        spec = preparing.spec
        try:
            if preparing.number is None:
                preparing.number = self._next_number(spec)
                log.info("job %s: still preparing (%s); telling the other workers every %g s", spec.id,
                         preparing.phase, interval_for(spec.timeout))
            name = keepalive_name(spec.seat, preparing.number)
            body = json.dumps({"phase": preparing.phase[:PHASE_MAX_CHARS]}).encode()
            for to_seat, party in spec.parties.items():
                if preparing.ended:
                    return  # meanwhile: not counted, as not every partner has it
                # A partner this number reached before the spool refused another's (full, read-only) keeps it:
                # sealed again, its other bytes under the same name would be refused by the broker, or taken for
                # a forgery by the partner once it has the first.
                if to_seat == spec.seat or self.spool.outbox_has(spec.id, to_seat, name):
                    continue
                address = MessageAddress(spec.id, spec.seat, to_seat, name)
                with atomic_writer(self.spool.outbox_path(spec.id, to_seat, name), overwrite=False) as out:
                    SealedMessage.seal([body], out, address, party.encryption_key, self.keys.signing)
            preparing.number += 1
            self.sent += 1
            self._refused.discard(spec.id)
        except OSError as exc:  # a full or read-only spool: the job itself says so; try again next time
            if spec.id not in self._refused:
                self._refused.add(spec.id)
                log.warning("job %s: cannot write a keep-alive to the outbox (%s); its partners may stop waiting "
                            "for it", spec.id, exc.strerror or exc)
        except Exception:  # noqa: BLE001 - one job's failure must not end the keep-alives of the others
            log.exception("job %s: unexpected failure writing a keep-alive", spec.id)

    def _next_number(self, spec: JobSpec) -> int:
        """One past the highest keep-alive number in the job's outbox (sealed or sent): after a restart too."""
        numbers = [_number(name, spec.seat) for seat in spec.parties if seat != spec.seat
                   for name in self.spool.outbox_names(spec.id, seat)]
        return 1 + max((n for n in numbers if n is not None), default=0)

