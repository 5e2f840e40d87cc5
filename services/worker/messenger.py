"""The messenger program: sealed messages out of the outbox to the broker, and in from the broker to the inbox.

Two loops share one stop flag. The sender puts outbox files at the broker (streamed from disk), a few at a time per
job (up to `PUTS_PER_JOB`, on a pool of `PUT_THREADS` threads, each with its own connection), and renames each to
.sent only after the broker confirmed it; puts are idempotent, so a put repeated after a crash is harmless. The
receiver long-polls the broker for every active job, downloads what is waiting (`GET_THREADS` at a time), verifies
and opens each message (signature of the expected sender, addressed to this seat, this job, this name) straight
from the download stream into a temporary inbox file, moves it into place durably, and only then acknowledges it
(DELETE) at the broker.
A message that fails verification is dropped, logged (without its content) and acknowledged, and noted in the
spool so the runner can say why it is still waiting. A second copy of a name already received is verified too:
the first is kept, and a copy that is not the same genuine message leaves the same trace. A late runner's
keep-alives (keepalive.py) are messages like any other here, sent, verified, placed and rejected the same way; only
their passage is logged at DEBUG (one a minute per partner while a seat prepares). A message that would
leave less than `spool.RESERVE_BYTES` free on the spool volume waits at the broker until there is room (inbox files
stay until their job ends, and a peer, buggy or not, could otherwise fill the volume every program writes to).

A keep-alive larger than any a worker sends (`MAX_SEALED_BYTES`) is refused before download.

Run as `python -m services.worker.messenger`; SIGTERM stops it within a second or two.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.worker import health
from services.worker.broker_client import BrokerClient, BrokerConflict, BrokerError, BrokerUnavailable
from services.worker.disk_advice import disk_advice
from services.worker.job_spec import JobSpec, JobSpecError
from services.worker.keepalive import MAX_SEALED_BYTES, is_keepalive_name
from services.worker.keys import WorkerKeys
from services.worker.outage_log import SAID_EVERY_SECONDS, OutageLog
from services.worker.sealing import MessageAddress, MessageRejected, SealedMessage
from services.worker.spool import (RESERVE_BYTES, InvalidName, OutboxItem, Spool, atomic_writer, mib,
                                   validate_message_name)

if TYPE_CHECKING:  # the programs read their configuration only in main()
    from services.worker.config import WorkerConfig

log = logging.getLogger("cape.messenger")
LONG_POLL_SECONDS = 1.0
IDLE_SECONDS = 0.01  # without a spool watch, how often the sender looks at the outbox and its finished puts
NO_JOBS_SECONDS = 0.2  # with no active job and no spool watch, the receiver looks for one again after this long
MULTI_JOB_POLL_SECONDS = 0.05  # a broker that lists one job at a time: the pause between rounds that found nothing
MAX_JOBS_PER_LIST = 50  # the broker's limit for one listing of several jobs: those the runner works on first
MULTI_LIST_RETRY_SECONDS = 300.0  # a broker that could not list several jobs at once is asked again after this
MAX_BACKOFF_SECONDS = 10.0  # short enough to catch up quickly after a broker restart
STILL_FAILING_SAID_EVERY_SECONDS = SAID_EVERY_SECONDS  # an unavailable broker is said again this often
PUTS_PER_JOB = 3  # concurrent puts of one job's messages: overlaps one message's latency with the next's transfer
PUT_THREADS = 6
# Concurrent downloads: one message's inbox fsync and acknowledgement overlap the next's transfer. One at a time,
# the receiver fell behind the sender (the e2e bench: 0.4 s from broker to inbox per 8 MiB block, with the CPU idle).
GET_THREADS = 3
TAKE_WAIT_SECONDS = 1.0  # how long a receiver pass waits for its downloads before it lists again (skipping them)
ROOM_RETRY_SECONDS = 5.0  # a message held for room is looked at again after this long (not a tight loop)
VANISHED_RETRY_SECONDS = 1.0  # a pass whose listed messages were all gone when fetched pauses this long


class Messenger:
    """Moves sealed messages between the spool and the broker for one worker."""

    def __init__(
        self,
        spool: Spool,
        keys: WorkerKeys,
        broker: BrokerClient,
        stop: threading.Event | None = None,
        long_poll: float = LONG_POLL_SECONDS,
        reserve_bytes: int = RESERVE_BYTES,
        run_dir: Path | None = None,
    ) -> None:
        self.spool = spool
        self.keys = keys
        self.broker = broker
        self.stop = stop or broker.stop
        self.long_poll = long_poll
        self.reserve_bytes = reserve_bytes
        self.run_dir = run_dir  # where the short-of-room record goes for `health` and `status` (None: nowhere)
        self._short_of_room: set[str] = set()  # jobs with a message held at the broker for room, said once each
        # Jobs with a message whose inbox file the spool refused since one was last placed (said once): the record
        # goes when one is placed, or when they all ended (none of their messages comes any more).
        self._inbox_refused_jobs: set[str] = set()
        self._held = 0  # messages held for room in the current receiver pass
        self._vanished = 0  # listed messages the broker no longer had when fetched, in the current receiver pass
        self._retry_at: dict[str, tuple[float, float]] = {}  # outbox path -> (next attempt, last delay)
        self._lock = threading.Lock()
        self._in_flight: dict[str, OutboxItem] = {}  # outbox path -> item, queued or being put (sender loop only)
        self._put_queue: queue.Queue[OutboxItem] = queue.Queue()
        self._done_queue: queue.Queue[tuple[OutboxItem, bool | Exception]] = queue.Queue()
        self._put_threads: list[threading.Thread] = []
        self._gets: ThreadPoolExecutor | None = None
        self._downloads: dict[tuple[str, str], Future[bool]] = {}  # (job, name) -> download (receiver loop only)
        self._specs: dict[str, JobSpec | None] = {}
        self._unreadable_said: set[str] = set()  # jobs whose description the spool could not read, said once
        self._per_job_until = 0.0  # a broker without `GET /messages?job=...` is polled job by job until then
        self._refusals_said: set[tuple[str, str]] = set()
        self._sender: threading.Thread | None = None
        self.sent = 0
        self.received = 0
        self.rejected = 0

    # ---- outgoing -------------------------------------------------------------------------------------------
    def send_pending(self) -> int:
        """Start puts of due outbox files (up to `PUTS_PER_JOB` per job in flight) and collect those that finished
        (each finished put wakes the sender loop); returns how many the broker confirmed. Raises
        `BrokerUnavailable` from a put."""
        now = time.monotonic()
        for item in self.spool.pending_outbox():
            if self.stop.is_set():
                break
            key = str(item.path)
            if key in self._in_flight or self._retry_at.get(key, (0.0, 0.0))[0] > now:
                continue
            if self.spool.ended(item.job_id) is not None:
                self.spool.discard_outbox_item(item)  # the coordinator ended the job: nobody will read it
                self._retry_at.pop(key, None)
                continue
            if sum(1 for other in self._in_flight.values() if other.job_id == item.job_id) >= PUTS_PER_JOB:
                continue
            self._in_flight[key] = item
            self._put_queue.put(item)
            self._start_put_threads()
        return self._collect()

    def _collect(self) -> int:
        confirmed = 0
        failure: Exception | None = None
        while True:
            try:
                item, outcome = self._done_queue.get_nowait()
            except queue.Empty:
                break
            self._in_flight.pop(str(item.path), None)
            if outcome is True:
                confirmed += 1
            elif isinstance(outcome, Exception) and not isinstance(failure, BrokerUnavailable):
                failure = outcome  # raised below, as a put in this thread would: the loop backs off and logs it
        if failure is not None:
            raise failure
        return confirmed

    def _start_put_threads(self) -> None:
        while len(self._put_threads) < min(PUT_THREADS, len(self._in_flight)):
            thread = threading.Thread(target=self._put_worker, name=f"messenger-put-{len(self._put_threads)}",
                                      daemon=True)
            self._put_threads.append(thread)
            thread.start()

    def _put_worker(self) -> None:
        while not self.stop.is_set():
            try:
                item = self._put_queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                outcome: bool | Exception = self._send_one(item)
            except Exception as exc:  # noqa: BLE001 - handed to the sender loop, which backs off or logs it
                outcome = exc
            self._done_queue.put((item, outcome))
            self.spool.changes.wake()  # the sender loop collects it now and starts the next put

    def _send_one(self, item: OutboxItem) -> bool:
        try:
            new = self.broker.put(item.job_id, item.to_seat, item.name, item.path)
        except FileNotFoundError:
            return False  # discarded meanwhile
        except BrokerConflict:
            # Someone put other bytes under our name (tampering, or a stale copy): the recipient drops those
            # after failing to verify them, and a later retry stores ours.
            self._later(item, "the broker holds other bytes under this name")
            return False
        except BrokerUnavailable:
            raise
        except BrokerError as exc:
            self._later(item, str(exc))
            return False
        self.spool.mark_sent(item)
        with self._lock:
            self._retry_at.pop(str(item.path), None)
            self.sent += 1
        log.log(_level(item.name), "sent %s to %s for job %s (%s)", item.name, item.to_seat, item.job_id,
                "stored" if new else "already stored")
        return True

    def _later(self, item: OutboxItem, why: str) -> None:
        with self._lock:
            _, last = self._retry_at.get(str(item.path), (0.0, 0.0))
            delay = min(MAX_BACKOFF_SECONDS, max(1.0, last * 2))
            self._retry_at[str(item.path)] = (time.monotonic() + delay, delay)
        log.warning("could not send %s to %s for job %s: %s; retrying in %.0f s", item.name, item.to_seat,
                    item.job_id, why, delay)

    # ---- incoming -------------------------------------------------------------------------------------------
    def receiving_jobs(self) -> list[JobSpec]:
        """Jobs whose messages this worker still needs: a spec, not ended, the runner not done."""
        jobs = []
        active = self.spool.active_job_ids()
        self._forget_ended_shortage(set(active))
        # Downloads of a job no longer active are not collected by `_take`: forget them once done.
        self._downloads = {key: f for key, f in self._downloads.items() if key[0] in active or not f.done()}
        # Parsed specs of the active jobs only (a long-running messenger sees thousands of jobs); None for a spec
        # that cannot be parsed, so its error is logged once.
        self._specs = {job_id: self._specs[job_id] for job_id in active if job_id in self._specs}
        for job_id in active:
            if job_id not in self._specs and not self._load_spec(job_id):
                continue
            spec = self._specs[job_id]
            if spec is not None:
                jobs.append(spec)
        if len(jobs) < 2:  # the usual case, once per received batch: no order to find
            return jobs
        # As the runner takes them: the jobs holding its slots first (loading or computing), then the others it
        # claimed (queued for a slot), then by approval. A multi-job listing covers the first MAX_JOBS_PER_LIST; a
        # job's spec is rewritten when it starts, so spool order would put a running job last, and dozens of
        # queued jobs (waiting for a worker that is down) must not push a running one out of the listing.
        claimed = set(self.spool.claimed_jobs())
        working = {job_id for job_id in claimed if self.spool.is_working(job_id)}
        return sorted(jobs, key=lambda spec: (spec.id not in working, spec.id not in claimed, spec.approved_at or "",
                                              spec.id))

    def _load_spec(self, job_id: str) -> bool:
        """Parse `job_id`'s spec into `_specs` (None if it is bad, said once); False if the spool could not read it
        now (too many open files, a permission being fixed): the next pass tries again."""
        try:
            raw = self.spool.read_job(job_id) or {}
        except OSError as exc:
            if job_id not in self._unreadable_said:
                self._unreadable_said.add(job_id)
                log.warning("job %s: cannot read its description from the spool (%s); trying again each pass",
                            job_id, exc.strerror or exc)
            return False
        self._unreadable_said.discard(job_id)
        try:
            self._specs[job_id] = JobSpec.parse(raw)
        except Exception as exc:  # noqa: BLE001 - one job's bad description must not stop the others'
            why = exc if isinstance(exc, JobSpecError) else f"unexpected {type(exc).__name__}"
            log.error("job %s: cannot receive its messages: %s", job_id, why)
            self._specs[job_id] = None
        return True

    def _forget_ended_shortage(self, active: set[str]) -> None:
        """Jobs held for room, or whose inbox file the spool refused, that ended (their messages removed) wait for
        nothing: without any left, the record goes."""
        with self._lock:
            ended = (self._short_of_room | self._inbox_refused_jobs) - active
            self._short_of_room -= ended
            self._inbox_refused_jobs -= ended
            over = bool(ended) and not self._short_of_room and not self._inbox_refused_jobs
        if over:
            health.SPOOL_SHORT_OF_ROOM.note(self.run_dir, None, log)

    def receive(self, spec: JobSpec, wait: float) -> int:
        """Take in the messages waiting for this worker in `spec`'s job, up to `GET_THREADS` at a time (`_take`);
        returns how many were placed. A failure of one is raised once collected (the loop backs off)."""
        return self._take([(spec, self.broker.wait_for_messages(spec.id, wait))])

    def receive_many(self, specs: list[JobSpec], wait: float) -> int | None:
        """`receive` for several jobs in one long poll of the broker; None if the broker cannot list several jobs
        at once (an older cape-server), so the caller polls each job in turn."""
        try:
            listing, refused = self.broker.wait_for_jobs_messages([spec.id for spec in specs], wait)
        except BrokerError as exc:
            # The route missing (an older cape-server: a generic 404 or 405), not a Cape error such as
            # broker_not_here (a CAPE_BROKER to fix, which the loop reports and retries).
            if not isinstance(exc, BrokerUnavailable) and (exc.status == 405 or (exc.status == 404 and exc.code in
                                                                                  (None, "not_found"))):
                log.warning("receiving: the broker cannot list several jobs' messages at once (%s); asking each job "
                            "in turn, and trying again in %.0f s", exc, MULTI_LIST_RETRY_SECONDS)
                return None
            raise
        self._refusals_said = {said for said in self._refusals_said if said[0] in refused}
        for job_id, error in refused.items():
            said = (job_id, str(error.get("code")))
            if said not in self._refusals_said:  # a job unknown to the broker or not this seat's: said once
                self._refusals_said.add(said)
                log.warning("receiving: the broker refuses job %s (%s): %s", job_id, error.get("code"),
                            error.get("message"))
        if len(refused) == len(specs):
            self.stop.wait(wait)  # nothing the broker would wait on: pause as a long poll would, until the poller
            return 0              # ends these jobs
        return self._take([(spec, listing[spec.id]) for spec in specs if listing.get(spec.id)])

    def _take(self, listing: list[tuple[JobSpec, list[dict[str, Any]]]]) -> int:
        """Start downloading the listed messages that are not being downloaded already, then wait for the listed
        jobs' downloads, together, up to `TAKE_WAIT_SECONDS`; returns how many were placed meanwhile. One that
        stalls or trickles holds up neither the others nor the next listing (which skips it): joining every
        download of a listing made one stalled connection hold every job's messages for a minute, and a wait per
        job made a pass over several jobs with stalled downloads last a second per job. A failure is raised once
        collected (the loop backs off)."""
        if self._gets is None:
            self._gets = ThreadPoolExecutor(GET_THREADS, thread_name_prefix="messenger-get")
        for spec, entries in listing:
            for entry in entries:
                key = (spec.id, str(entry.get("name")))
                if key not in self._downloads and not self.stop.is_set():
                    self._downloads[key] = self._gets.submit(self._accept_unless_stopped, spec, entry)
        listed = {spec.id for spec, _ in listing}
        mine = {key: future for key, future in self._downloads.items() if key[0] in listed}
        wait_for_futures(mine.values(), timeout=TAKE_WAIT_SECONDS)
        placed, failure = 0, None
        for key, future in mine.items():
            if not future.done():
                continue
            del self._downloads[key]
            try:
                placed += future.result()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the others were collected
                failure = failure or exc
        if failure is not None:
            raise failure
        return placed

    def _accept_unless_stopped(self, spec: JobSpec, entry: dict[str, Any]) -> bool:
        return not self.stop.is_set() and self._accept(spec, entry)

    def _accept(self, spec: JobSpec, entry: dict[str, Any]) -> bool:
        try:
            name = validate_message_name(entry.get("name"))  # type: ignore[arg-type]
        except InvalidName:
            log.error("job %s: the broker listed a message with an invalid name; ignoring it", spec.id)
            return False
        from_seat = entry.get("from_seat")
        problem = self._misaddressed(spec, name, from_seat)
        if problem:
            self._reject(spec, name, str(from_seat), problem)
            return False
        size = entry.get("size")
        if is_keepalive_name(name) and isinstance(size, int) and size > MAX_SEALED_BYTES:
            self._reject(spec, name, str(from_seat), f"a keep-alive of {size} bytes; keep-alives are at most "
                                                     f"{MAX_SEALED_BYTES} bytes (not downloaded)")
            return False
        inbox = self.spool.inbox_path(spec.id, name)
        if inbox.exists():
            self._second_copy(spec, name, str(from_seat), inbox, size)
            return False
        if not self._room_for(spec, name, size):
            return False
        try:
            # Decrypted straight from the download into the inbox's temporary file; it appears only if it verified.
            with self.broker.stream(spec.id, name, size) as source, atomic_writer(inbox, overwrite=False) as out:
                SealedMessage.open(source, out, self._address(spec, name, from_seat), self.keys.encryption,
                                   spec.parties[str(from_seat)].signing_key)
        except MessageRejected as exc:
            self._reject(spec, name, str(from_seat), str(exc))
            return False
        except BrokerError as exc:
            self._unless_gone(exc)
            return False
        except OSError as exc:
            if not str(exc.filename or "").startswith(str(self.spool.root)):
                raise
            if isinstance(exc, FileNotFoundError) and self.spool.done(spec.id) is not None:
                # The runner finished the job and removed its inbox under the write: nothing is waited for.
                log.debug("job %s: %s came as the job finished; not kept", spec.id, name)
                return False
            self._inbox_refused(spec, name, exc)
            return False
        with self._lock:
            refused, self._inbox_refused_jobs = self._inbox_refused_jobs, set()
            short = bool(self._short_of_room)
        if refused:
            log.info("the spool takes messages again")
            if not short:  # a job held for room keeps the record
                health.SPOOL_SHORT_OF_ROOM.note(self.run_dir, None, log)
        self.broker.delete(spec.id, name)  # only now: the plaintext is durable in the inbox
        with self._lock:
            self.received += 1
        log.log(_level(name), "received %s from %s for job %s", name, from_seat, spec.id)
        return True

    def _room_for(self, spec: JobSpec, name: str, size: Any) -> bool:
        """Whether the spool volume keeps `reserve_bytes` free after this message; if not, say so once per job
        (the message stays at the broker, and the receiver looks again in `ROOM_RETRY_SECONDS`)."""
        free = self.spool.free_bytes()
        if free - (size if isinstance(size, int) and size > 0 else 0) >= self.reserve_bytes:
            with self._lock:  # the shortage is the volume's: over for every job once one message fits
                held, self._short_of_room = self._short_of_room, set()
                refusing = bool(self._inbox_refused_jobs)
            if held:
                log.info("the spool volume has room again; taking the messages of job(s) %s", ", ".join(sorted(held)))
                if not refusing:  # room is not enough where the spool refused an inbox file: a write must go through
                    health.SPOOL_SHORT_OF_ROOM.note(self.run_dir, None, log)
            return True
        with self._lock:
            self._held += 1
            first = spec.id not in self._short_of_room
            self._short_of_room.add(spec.id)
        if first:
            why = (f"message {name} ({mib(size) if isinstance(size, int) else 'unknown size'}) of job {spec.id} "
                   f"waits at the broker: the spool volume (CAPE_SPOOL_DIR) has {mib(free)} free and the messenger "
                   f"keeps {mib(self.reserve_bytes)} free "
                   "for the worker's other files; it is taken once jobs end and their messages are removed, or the "
                   "volume grows")
            log.warning("%s", why)
            health.SPOOL_SHORT_OF_ROOM.note(self.run_dir, why, log)
        return False

    def _inbox_refused(self, spec: JobSpec, name: str, exc: OSError) -> None:
        """The spool refused the inbox file (full, read-only): the message waits at the broker, said once in the log
        and for `health` and `status` until one is placed again. Raised, it was a traceback at every retry, and the
        job's error blamed the sender's worker for a message the broker held all along."""
        with self._lock:
            self._held += 1  # the receiver looks again in ROOM_RETRY_SECONDS, as for a message held for room
            first = not self._inbox_refused_jobs
            self._inbox_refused_jobs.add(spec.id)
        if first:
            why = (f"message {name} of job {spec.id} waits at the broker: the spool cannot write it ({exc.filename}: "
                   f"{exc.strerror or exc}); {disk_advice(exc, 'CAPE_SPOOL_DIR')}")
            log.error("%s", why)
            health.SPOOL_SHORT_OF_ROOM.note(self.run_dir, why, log)

    def _second_copy(self, spec: JobSpec, name: str, from_seat: str, inbox: Path, size: Any) -> None:
        """Another message under a name already received: keep the first; drop this one, leaving a trace unless
        it is the same genuine message (a redelivery after a crash before the acknowledgement)."""
        digest = hashlib.sha256()
        try:
            with self.broker.stream(spec.id, name, size) as source:
                SealedMessage.open(source, _HashingSink(digest), self._address(spec, name, from_seat),
                                   self.keys.encryption, spec.parties[from_seat].signing_key)
        except MessageRejected as exc:
            self._reject(spec, name, from_seat, f"a second copy of an already received message fails verification "
                                                f"({exc}); the first is kept")
            return
        except BrokerError as exc:
            self._unless_gone(exc)
            return
        if digest.digest() != _file_sha256(inbox):
            self._reject(spec, name, from_seat, "a second, different message under a name already received; "
                                                "the first is kept", conflict=not is_keepalive_name(name))
            return
        log.info("job %s: dropped a second copy of %s from %s (the same message as the one received)", spec.id,
                 name, from_seat)
        self.broker.delete(spec.id, name)

    def _unless_gone(self, exc: BrokerError) -> None:
        """Re-raise `exc` unless it says the listed message is no longer there (it expired or was acknowledged
        meanwhile). Only the broker's own code says that: a proxy's or another server's 404 is an error to report
        and back off from, not a message gone (taking it so re-listed the message hundreds of times a second)."""
        if exc.status != 404 or exc.code != "message_not_found" or isinstance(exc, BrokerUnavailable):
            raise exc
        with self._lock:
            self._vanished += 1

    @staticmethod
    def _address(spec: JobSpec, name: str, from_seat: Any) -> MessageAddress:
        return MessageAddress(spec.id, str(from_seat), spec.seat, name)

    @staticmethod
    def _misaddressed(spec: JobSpec, name: str, from_seat: Any) -> str | None:
        if from_seat not in spec.parties or from_seat == spec.seat:
            return "the sender is not another party of the job"
        if not name.startswith(f"{from_seat}."):
            return f"the name does not belong to the sender's seat {from_seat}"
        return None

    def _reject(self, spec: JobSpec, name: str, from_seat: str, reason: str, conflict: bool = False) -> None:
        with self._lock:
            self.rejected += 1
        log.warning("job %s: dropped message %s from %s: %s", spec.id, name, from_seat, reason)
        self.spool.record_rejection(spec.id, name, from_seat, reason, conflict=conflict)
        self.broker.delete(spec.id, name)

    # ---- loops ----------------------------------------------------------------------------------------------
    def sender_loop(self) -> None:
        """Send outbox files until stopped; back off while the broker is unreachable."""
        self._loop("sending", lambda: self.send_pending() > 0 or None, idle=IDLE_SECONDS)  # None: nothing to send

    def receiver_loop(self) -> None:
        """Receive messages for the active jobs until stopped; back off while the broker is unreachable."""

        def once() -> bool | None:
            self._held = self._vanished = 0
            busy = receive_once()
            if self._held:  # messages wait at the broker for room: their listing would return at once
                self.stop.wait(ROOM_RETRY_SECONDS)
            elif self._vanished and not busy:  # listed, then gone when fetched: a stale listing would come back
                self.stop.wait(VANISHED_RETRY_SECONDS)  # at once
            return busy

        def receive_once() -> bool | None:
            if self._sender is not None and not self._sender.is_alive():
                raise SystemExit("the sender loop stopped")  # let supervisord restart the whole program
            seen = self.spool.changes.generation
            jobs = self.receiving_jobs()
            if not jobs:
                self.spool.changes.wait(seen, NO_JOBS_SECONDS)  # a new job's spec wakes it
                return None
            if len(jobs) == 1:
                return self.receive(jobs[0], self.long_poll) > 0
            if time.monotonic() >= self._per_job_until:
                placed = self.receive_many(jobs[:MAX_JOBS_PER_LIST], self.long_poll)
                if placed is not None:
                    return placed > 0
                self._per_job_until = time.monotonic() + MULTI_LIST_RETRY_SECONDS
            # An older broker: a long poll of one job would hold up the others' messages, so look at each in turn,
            # pausing briefly when none had anything (not a tight loop of requests to the broker).
            if sum(self.receive(spec, 0.0) for spec in jobs if not self.stop.is_set()):
                return True
            self.stop.wait(MULTI_JOB_POLL_SECONDS)
            return False

        self._loop("receiving", once, idle=0.0)

    def _loop(self, what: str, once, idle: float) -> None:  # type: ignore[no-untyped-def]
        """Run `once` until stopped: it returns True (it moved messages), False (it asked the broker, nothing to
        move) or None (it had nothing to ask: no evidence the broker is back after a failure).

        An unavailable broker is said when it starts, then at most once per `STILL_FAILING_SAID_EVERY_SECONDS`
        (an outage of hours is a few lines, not one per retry), and recorded for `cape-worker status`."""
        failures = 0
        outage = OutageLog(log, STILL_FAILING_SAID_EVERY_SECONDS)
        while not self.stop.is_set():
            seen = self.spool.changes.generation  # before looking: a file landing meanwhile ends the idle wait
            try:
                busy = once()
            except BrokerUnavailable as exc:
                failures += 1
                delay = random.uniform(0.5, 1.0) * min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** (failures - 1))
                if outage.failed(f"{what}: {exc}; retrying in {delay:.1f} s"):
                    health.BROKER_UNREACHABLE.note(self.run_dir, str(exc), log)
                self.stop.wait(delay)
                continue
            except BrokerError as exc:
                failures += 1
                log.error("%s: %s", what, exc)
                self.stop.wait(min(MAX_BACKOFF_SECONDS, 2.0 * failures))
                continue
            except Exception as exc:  # noqa: BLE001 - a loop must not die silently; the next pass retries
                failures += 1
                log.exception("%s: unexpected %s; retrying", what, type(exc).__name__)
                self.stop.wait(min(MAX_BACKOFF_SECONDS, 1.0 * failures))
                continue
            if failures and busy is not None:
                lasted = outage.recovered()
                if lasted is not None:
                    log.info("%s: the broker is reachable again (%s)", what, lasted)
                    health.BROKER_UNREACHABLE.note(self.run_dir, None, log)
                failures = 0
            if not busy and idle:
                self.spool.changes.wait(seen, idle)

    def run(self) -> None:
        """Run both loops until the stop flag is set (the receiver in this thread)."""
        for record in (health.SPOOL_SHORT_OF_ROOM, health.BROKER_UNREACHABLE):
            record.note(self.run_dir, None, log)  # a record of an earlier run: said again if still true
        self._sender = threading.Thread(target=self.sender_loop, name="messenger-sender", daemon=True)
        self._sender.start()
        try:
            self.receiver_loop()
        finally:
            self.stop.set()
            self.spool.changes.wake()  # the sender may be waiting for a spool change
            self._sender.join(timeout=2.0)
            if self._gets is not None:
                self._gets.shutdown(wait=False, cancel_futures=True)


def _level(name: str) -> int:
    """How a message's passage is logged: a keep-alive (one a minute per partner of a late seat) at DEBUG."""
    return logging.DEBUG if is_keepalive_name(name) else logging.INFO


class _HashingSink:
    """A write-only file that only hashes what is written to it."""

    def __init__(self, digest: Any) -> None:
        self.digest = digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return len(data)


def _file_sha256(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").digest()


def main() -> int:
    """Entry point of the supervisord program `messenger`."""
    from services.worker import program

    def relay(config: WorkerConfig) -> None:
        keys = program.load_keys(config)
        stop = threading.Event()
        broker = BrokerClient(config.broker, config.token, stop=stop)
        spool = Spool(config.spool_dir)
        spool.sweep_temp()
        log.info("relaying messages through %s", config.broker)
        with spool.watching("outbox", "jobs"):
            try:
                Messenger(spool, keys, broker, stop, run_dir=config.run_dir).run()
            finally:
                stop.set()
                broker.close()

    return program.run("messenger", relay)


if __name__ == "__main__":
    from services.process_exit import run_then_exit

    run_then_exit(main)  # a stop does not wait for threads blocked on the network: see services/process_exit.py
