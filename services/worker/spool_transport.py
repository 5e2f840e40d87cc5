"""The engine's `Transport` over the spool: sent arrays are sealed into the outbox, received ones read from the inbox.

`send` writes the array as .npy (header + raw bytes, streamed through the sealer) into a sealed outbox file; the
first write of a name wins, so a replaying runner never produces a second, different ciphertext for a message.
`receive` waits for the inbox file the messenger placed after verifying and opening the sealed message; inbox files
stay until the job ends, so a replay reads them again. A wait lasts the job's timeout, longer while the sender's
keep-alives say it is still preparing (keepalive.py, partner_wait.py). The first message this transport seals (not
one a replay finds written) is when its own seat stops sending keep-alives (`sending`).

Sealing and fsync run on one background thread per transport, in send order, so the engine computes the next
block meanwhile; at most `write_ahead` sends wait (the engine must not modify a sent array, per the Transport
contract, so they are not copied). A kill -9 loses only sends not yet durable: the runner's claim is still there,
and the replay seals them then. The runner calls `flush()` before it writes the job's result or `completed`, and
`close()` (which also waits for the queued writes) before it marks the job done and releases its claim.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from services.worker.job_spec import JobSpec
from services.worker.keepalive import PartnerKeepAlives, is_keepalive_name
from services.worker.keys import WorkerKeys
from services.worker.outage_log import without_numbers
from services.worker.partner_wait import LIMIT_TIMEOUTS, STALLED_SECONDS, PartnerWait
from services.worker.sealing import MessageAddress, SealedMessage
from services.worker.spool import MESSAGE_NAME_PATTERN, Spool, atomic_writer

from services.mpc import ProtocolError, TransportTimeout
from services.mpc.transport import Expected

log = logging.getLogger(__name__)
# Without a spool watch, a wait ends at most 10 ms after the file appears (an open() is cheap).
_POLL_MIN, _POLL_MAX = 0.002, 0.01
WRITE_AHEAD = 4  # sends waiting for the background sealer; bounds the memory they hold
DROP_CACHE_BYTES = 1 << 20  # inbox files from this size on leave the page cache once read
_SEALER_IDLE_SECONDS = 5.0
# A wait this long looks at what this worker's own messenger reports (a broker away, a spool short of room), and
# again as often: the message may be held on this side, which the seat says (else it showed nothing of it).
OWN_TROUBLE_LOOK_SECONDS = 5.0


class SpoolTransportTimeout(TransportTimeout):
    """A message did not arrive within the job's bound; the message says which, from whom, and any rejections."""


class PartnerMessageInvalid(ProtocolError):
    """A partner's message verified (its own worker sealed and signed it) but is not the array the protocol expects
    there: another shape or dtype, cut short, or no array at all. The job cannot go on; the message names that
    worker, whose operator has to look at it (a bug, another version, or a worker that means harm)."""


class JobInterrupted(Exception):
    """The runner must stop waiting: the program is stopping, or the coordinator ended the job."""


def wire_name(from_seat: str, engine_name: str) -> str:
    """The broker/inbox name of an engine message: the sender's seat, a dot, the engine's name.

    An engine name outside the broker's character set (e.g. `lr/x-rows`) becomes a readable form plus a digest of
    the original (`x_owner.lr-x-rows.h<20 hex>`), the same at both ends and distinct for distinct names; so does
    one that would read as a keep-alive's name (`preparing.3`), which are the runner's own.
    """
    candidate = f"{from_seat}.{engine_name}"
    if MESSAGE_NAME_PATTERN.fullmatch(candidate) and not is_keepalive_name(candidate):
        return candidate
    readable = re.sub(r"[^A-Za-z0-9_-]+", "-", engine_name).strip("-")[:80]
    digest = hashlib.sha256(engine_name.encode()).hexdigest()[:20]
    return f"{from_seat}.{readable}.h{digest}" if readable else f"{from_seat}.h{digest}"


def _npy_pieces(array: np.ndarray) -> list[bytes | memoryview]:
    import io

    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise TypeError("object arrays cannot be sent; the engine sends numeric arrays only")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return [header.getvalue(), memoryview(array.reshape(-1).view(np.uint8))]


def _read_inbox_array(path: Path, check: Callable[[tuple[int, ...], np.dtype], None] | None = None) -> np.ndarray:
    """An inbox message's array, read into memory; a large one is read-only and its file leaves the page cache.

    `check(shape, dtype)` sees the header first and may refuse the message before its data is read: a peer's
    array of another shape could otherwise make the runner allocate up to the broker's message limit.

    Inbox files stay until the job ends only for a replay after a crash, which reads them again from disk. Left
    cached, every block the messenger writes needs fresh pages; dropped once read, a block's pages are free for the
    messenger's next one. On a VM that hands free memory back to its host, that takes about 40% off the receiving
    messenger's CPU (./scripts/bench --e2e, 11 runs each: the y-owner's 0.60-0.93 CPU-s, against 0.88-1.31 with
    the files mapped), while the runner's copy goes to heap memory its previous blocks freed.
    The engine never writes to a received array; a large one is read-only so a write would raise, not go unnoticed.
    """
    with open(path, "rb") as handle:
        if check is not None:
            version = np.lib.format.read_magic(handle)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(handle) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(handle))
            check(shape, dtype)
            handle.seek(0)
        array = np.lib.format.read_array(handle, allow_pickle=False)
        if os.fstat(handle.fileno()).st_size < DROP_CACHE_BYTES:
            return array
        if hasattr(os, "posix_fadvise"):  # Linux; elsewhere the kernel keeps its own counsel
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    array.flags.writeable = False
    return array


class OutboxWriteTimeout(ProtocolError):
    """Sealed messages could not be written to the outbox in time (a stalled disk); the job cannot go on."""


class _BackgroundSealer:
    """One thread that runs queued outbox writes in order; at most `depth` wait, so memory stays bounded.

    A write that fails is re-raised in the engine's thread by the next `submit` or `wait_idle`, and the writes
    queued behind it are dropped (the job fails; a replay writes them).
    """

    def __init__(self, depth: int, name: str) -> None:
        self.depth = depth
        self.name = name
        self._cond = threading.Condition()
        self._pending: deque[Callable[[], None]] = deque()  # the head stays while it runs, so waits cover it
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, work: Callable[[], None], timeout: float) -> None:
        """Queue `work`, waiting (up to `timeout` s) while `depth` writes are already queued."""
        with self._cond:
            self._raise_error()
            if not self._cond.wait_for(lambda: len(self._pending) < self.depth or self._error is not None,
                                       timeout):
                raise OutboxWriteTimeout(f"sealed messages were not written to the outbox within {timeout:g} s; "
                                         "check the spool volume (CAPE_SPOOL_DIR) is writable and not full")
            self._raise_error()
            self._pending.append(work)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def wait_idle(self, timeout: float, *, raise_error: bool = True) -> bool:
        """Wait until every queued write is durable (True), or `timeout` s passed (False); re-raise a failure."""
        with self._cond:
            idle = self._cond.wait_for(lambda: not self._pending, timeout)
            if raise_error:
                self._raise_error()
            return idle

    def close(self) -> None:
        """Let the thread end once the queue is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed, _SEALER_IDLE_SECONDS)
                if not self._pending:
                    self._thread = None  # closed or idle: the next submit starts a new thread
                    return
                work = self._pending[0]
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - handed to the engine's thread, which fails the job
                with self._cond:
                    self._error = exc
                    self._pending.clear()
                    self._cond.notify_all()
                return
            with self._cond:
                self._pending.popleft()
                self._cond.notify_all()


class SpoolTransport:
    """Transport (CONTRACTS.md) of this worker's party in one job, over the spool."""

    def __init__(
        self,
        spool: Spool,
        spec: JobSpec,
        keys: WorkerKeys,
        timeout: float | None = None,
        interrupted: Callable[[], str | None] = lambda: None,
        write_ahead: int = WRITE_AHEAD,
        sending: Callable[[], None] = lambda: None,
        partner_preparing: Callable[[str, str | None, float], None] = lambda seat, phase, waited: None,
        own_trouble: Callable[[], str | None] = lambda: None,
        own_trouble_changed: Callable[[str, str | None, bool], None] = lambda seat, trouble, waiting: None,
    ) -> None:
        """`interrupted()` returns a reason to stop waiting (program stopping, job ended), or None.

        `write_ahead` > 0 seals on a background thread with that many sends queued at most; 0 seals in `send`.
        `sending()` is called once, before the first message is sealed. `partner_preparing(seat, phase, waited)`
        is called each time a wait for `seat` goes on past its deadline because the seat is still preparing
        (`phase`, as it said it, or None), `waited` seconds into the wait. `own_trouble()` says what this worker's
        own messenger reports against its link to the broker or its spool (None: nothing), for a wait that ends;
        `own_trouble_changed(seat, trouble, True)` is called when what it says changes during a long wait for
        `seat`, and `(seat, None, False)` when a wait during which it said something ends.
        """
        self.spool = spool
        self.spec = spec
        self.keys = keys
        self.party = spec.index
        self.timeout = spec.timeout if timeout is None else timeout
        self.interrupted = interrupted
        self.sending: Callable[[], None] | None = sending
        self.partner_preparing = partner_preparing
        self.own_trouble = own_trouble
        self.own_trouble_changed = own_trouble_changed
        self.bytes_sent = 0
        self.messages_sent = 0
        self.messages_received = 0
        self._sealer = _BackgroundSealer(write_ahead, f"sealer-{spec.id[:8]}") if write_ahead > 0 else None

    def send(self, to: int, name: str, array: np.ndarray) -> None:
        """Seal `array` for party `to` into the outbox (once: a name already written is left as it is).

        With a background sealer the write may still be in progress when this returns; see `flush`.
        """
        to_seat = self.spec.seat_of(to)
        if to == self.party:
            raise ValueError("a party cannot send to itself")
        wire = wire_name(self.spec.seat, name)
        if self.spool.outbox_has(self.spec.id, to_seat, wire):
            return  # written before a restart: the same run produces the same array, keep the first ciphertext
        if self.sending is not None:
            self.sending, sending = None, self.sending
            sending()
        if self._sealer is None:
            self._seal(to_seat, wire, array)
        else:
            self._sealer.submit(lambda: self._seal(to_seat, wire, array), self.timeout)

    def traffic(self) -> dict[str, int]:
        """What this transport sealed and read so far: messages_sent, bytes_sent (sealed sizes), messages_received."""
        return {"messages_sent": self.messages_sent, "bytes_sent": self.bytes_sent,
                "messages_received": self.messages_received}

    def flush(self) -> None:
        """Return once every sent message is durable in the outbox; re-raise a failed write."""
        if self._sealer is not None and not self._sealer.wait_idle(self.timeout):
            raise OutboxWriteTimeout(f"sealed messages were not written to the outbox within {self.timeout:g} s; "
                                     "check the spool volume (CAPE_SPOOL_DIR) is writable and not full")

    def close(self) -> None:
        """Wait (bounded) for queued writes, without raising (the job is ending either way), and stop the thread."""
        if self._sealer is not None:
            if not self._sealer.wait_idle(self.timeout, raise_error=False):
                log.warning("job %s: sealed messages still unwritten after %g s; a replay writes them",
                            self.spec.id, self.timeout)
            self._sealer.close()

    def __enter__(self) -> SpoolTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _seal(self, to_seat: str, wire: str, array: np.ndarray) -> None:
        address = MessageAddress(self.spec.id, self.spec.seat, to_seat, wire)
        with atomic_writer(self.spool.outbox_path(self.spec.id, to_seat, wire), overwrite=False) as out:
            size = SealedMessage.seal(
                _npy_pieces(array), out, address, self.spec.parties[to_seat].encryption_key, self.keys.signing
            )
        self.bytes_sent += size
        self.messages_sent += 1

    def receive(self, frm: int, name: str, expected: Expected | None = None) -> np.ndarray:
        """Wait for message `name` from party `frm` and return its array (refused unread if not `expected`)."""
        from_seat = self.spec.seat_of(frm)
        wire = wire_name(from_seat, name)
        path = self.spool.inbox_path(self.spec.id, wire)
        check = None if expected is None else partial(self._check, from_seat, name, expected)
        wait = PartnerWait(self.timeout, time.monotonic())
        partner: PartnerKeepAlives | None = None
        delay = _POLL_MIN
        looked = wait.started
        trouble_look, trouble = wait.started + OWN_TROUBLE_LOOK_SECONDS, None
        while True:
            seen = self.spool.changes.generation  # before looking: a file landing meanwhile ends the wait below
            try:
                array = _read_inbox_array(path, check)
                self.check_partner(wire)
                self.messages_received += 1
                if trouble:  # what the seat says of it would outlive the wait
                    self.own_trouble_changed(from_seat, None, False)
                return array
            except FileNotFoundError:
                pass
            except ValueError as exc:  # numpy's word for a .npy cut short, with a bad header, or not one at all
                log.warning("job %s: message %s from the %s worker is not a readable array: %s", self.spec.id, wire,
                            from_seat, exc)
                # numpy's text quotes the partner's header: it stays in this log, not in the job's error
                raise PartnerMessageInvalid(f"{self._worker(from_seat)} sent message {name!r} that is not a whole "
                                            "array (cut short, a malformed header, or no array at all); its operator "
                                            "checks that worker runs this version, unmodified") from None
            if partner is None:  # a wait after all: keep-alives already received are not news of this one
                partner = PartnerKeepAlives(self.spool, self.spec.id, from_seat)
            reason = self.interrupted()
            if reason:
                raise JobInterrupted(reason)
            now = time.monotonic()
            if now - looked >= STALLED_SECONDS:  # this worker was suspended: what came meanwhile is still on its way
                wait.resumed(now, now - looked)
                log.info("job %s: did not run for %.0f s (its machine suspended?); waiting for the %s worker afresh",
                         self.spec.id, now - looked, from_seat)
            looked = now
            if now >= trouble_look:
                trouble_look, said = now + OWN_TROUBLE_LOOK_SECONDS, self.own_trouble()
                if (said and without_numbers(said)) != (trouble and without_numbers(trouble)):  # not the MiB free
                    trouble = said
                    self.own_trouble_changed(from_seat, trouble, True)
            if wait.left(now) <= 0:
                fresh = bool(partner.fresh())
                if not wait.extend(now, fresh):
                    raise SpoolTransportTimeout(self._timeout_message(from_seat, wire, partner, limit=fresh))
                self.partner_preparing(from_seat, partner.phase, now - wait.started)
            # the messenger's inbox file (or an end) wakes it
            self.spool.changes.wait(seen, delay, at_most=max(0.0, wait.left(time.monotonic())))
            delay = min(_POLL_MAX, delay * 2)

    def check_partner(self, wire: str | None = None) -> None:
        """Refuse the job when a partner sealed and signed two different messages under one name (`wire`, or any):
        which one the protocol used depends on the order they came in, so the result cannot be trusted. Its worker
        holds the proof: both verified as that worker's own."""
        records = ({wire: self.spool.rejection(self.spec.id, wire) or {}} if wire is not None
                   else self.spool.rejections(self.spec.id))
        for name, record in records.items():
            if record.get("conflict"):
                seat = str(record.get("from_seat"))
                raise PartnerMessageInvalid(f"{self._worker(seat) if seat in self.spec.parties else seat} sent two "
                                            f"different messages under the name {name!r}, both sealed and signed by "
                                            "it; the job cannot be trusted to a result: its operator checks that "
                                            "worker runs this version, unmodified")

    def _worker(self, seat: str) -> str:
        return f"the {seat} worker (organization {self.spec.parties[seat].organization})"

    def _check(self, from_seat: str, name: str, expected: Expected, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """Refuse a partner's array of another shape or dtype from its header, naming that worker."""
        if tuple(shape) != expected.shape or np.dtype(dtype) != expected.dtype:
            raise PartnerMessageInvalid(f"{self._worker(from_seat)} sent message {name!r} as {np.dtype(dtype)} "
                                        f"{tuple(shape)}, expected {expected.dtype} {expected.shape}; are all "
                                        "workers running the same version?")

    def _timeout_message(self, from_seat: str, wire: str, partner: PartnerKeepAlives, limit: bool) -> str:
        said = f" ({partner.phase})" if partner.phase else ""
        worker = self._worker(from_seat)
        if limit:
            text = (f"no message {wire!r} from {worker} within {LIMIT_TIMEOUTS * self.timeout:g} s, "
                    f"{LIMIT_TIMEOUTS} times the job's timeout and the longest a wait lasts, although it kept saying "
                    f"it was still preparing{said}; give such jobs a longer timeout, or see at that worker why it "
                    "is slow (its seat says what it does)")
        elif partner.heard:
            text = (f"no message {wire!r} from {worker}: it said it was still preparing{said}, then nothing came "
                    f"from it for {self.timeout:g} s; check that worker is running and reaches the broker")
        else:
            text = (f"no message {wire!r} from {worker} within {self.timeout:g} s; check that worker is running "
                    "and reaches the broker (a worker still queued for a job slot or loading its data says so to "
                    "its partners, which then wait longer: nothing came from it)")
        rejected = [r for r in self.spool.rejections(self.spec.id).values() if r.get("from_seat") == from_seat]
        if rejected:
            text += (f"; {len(rejected)} message(s) claiming to come from {from_seat} were rejected "
                     f"({rejected[-1].get('reason')})")
        trouble = self.own_trouble()
        if trouble:  # the partner may have sent all along: a broker away or a full spool stops it on this side
            text += f"; meanwhile this worker's own messenger reports: {trouble}"
        return text
