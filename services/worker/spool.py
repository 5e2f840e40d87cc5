"""The spool directory: the only hand-off between the worker's four programs.

Every file a program hands to another is written under a temporary name (a dot file ending in `.tmp`, ignored by
every reader), fsynced, `rename()`d into place and its directory fsynced, so a reader sees a whole file or nothing
and a crash at any moment leaves at worst a torn temporary file. Names are built here from validated parts only.
Files landing in place (renamed or linked) are also what wakes the other programs (`Spool.watch`, spool_watch.py).

Layout (one directory per job under each stage):

    jobs/<job>/spec.json              the coordinator's WorkerJob (poller)
    jobs/<job>/ended.json             the coordinator ended the job: Stopped/Error/Completed/Rejected (poller)
    jobs/<job>/done.json              this worker's runner finished its role (runner)
    jobs/<job>/reported.json          the seat's final report as the coordinator took it (poller)
    claims/<job>.json                 a job the runner works on; survives the runner's restart; counts the runners
                                      killed while it worked on it
    claims/.runner-running.json       a runner runs, or died without stopping (its next start counts a kill)
    outbox/<job>/<to_seat>/<name>.sealed   sealed message to send (runner); once the broker has it, renamed to .sent
                                      and emptied (the name alone keeps a replaying runner from sealing it again),
                                      or removed once the runner is done with the job; the runner's keep-alives
                                      (`<seat>.preparing.<n>`, keepalive.py) too
    inbox/<job>/<name>.msg            verified plaintext of a received message (messenger): an engine message's
                                      .npy, or a partner's keep-alive (JSON)
    rejected/<job>/<name>.json        why a received message was dropped (messenger), for the runner's error;
                                      at most REJECTIONS_KEPT per job, kept as long as the job's record
    status/<job>/<seq>.json           status updates for the poller to report, in order
    results/<job>/result.json         the output seat's weights and metrics, for the uploader; once stored, moved
                                      to jobs/<job>/uploaded.json

The folders the programs scan often (outbox, status, results) hold only work in progress: a job's folder there is
removed once it is empty and the job no longer needs it, so a scan costs the same after thousands of jobs. Under
jobs/, the FINISHED_JOBS_KEPT most recently finished jobs stay (`cape-worker status` lists them; the coordinator
keeps every job's history), and each Spool remembers the jobs it saw done or ended and does not read their
markers again. A job's rejected/ records go with its record: the messenger's log (and CloudWatch) keeps every
rejection, and a peer or a broker listing junk names cannot fill the volume.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from services.durable_files import fsync_dir
from services.worker.spool_watch import SpoolWatch

JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# The broker's message-name pattern, minus names starting with "." (our temporary files) and "..".
MESSAGE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
SEAT_PATTERN = re.compile(r"[a-z][a-z_]{0,31}")
_STATUS_NAME = re.compile(r"[0-9]{20}-[a-z]{1,16}-[0-9a-f]{8}\.json")
_TEMP_SUFFIX = ".tmp"
KILL_COUNTS = ("killed", "oom_killed", "not_oom")  # in a claim: runner deaths, and their causes when known
RUN_ID_VARIABLE = "CAPE_RUN_ID"  # set by `cape-worker run` for its supervisord and programs: one per run
RUNNER_RUNNING_NAME = ".runner-running.json"  # under claims/: a runner runs, or died (not a claim's name)
SCRATCH_PREFIX = ".scratch-"  # the runner's scratch files under tmp/ (an s3:// dataview being read)
REJECTIONS_KEPT = 100  # dropped messages recorded per job (each is also logged); more are only logged
FINISHED_JOBS_KEPT = 100  # finished jobs whose records stay in jobs/ (for `cape-worker status`); older ones go


class SpoolError(Exception):
    """A spool operation failed or a name from outside is not acceptable."""


class InvalidName(SpoolError, ValueError):
    """A job id, seat or message name does not match its strict pattern."""


def validate_job_id(job_id: str) -> str:
    """Return `job_id` if it is a safe job id, else raise `InvalidName`."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        raise InvalidName("job id must be 1-128 letters, digits, '_' or '-' (starting with a letter or digit)")
    return job_id


def validate_message_name(name: str) -> str:
    """Return `name` if it is a safe message name, else raise `InvalidName`."""
    if not isinstance(name, str) or not MESSAGE_NAME_PATTERN.fullmatch(name):
        raise InvalidName("message name must be 1-200 of [A-Za-z0-9._-], not starting with '.'")
    return name


def validate_seat(seat: str) -> str:
    """Return `seat` if it is a safe seat name (e.g. x_owner), else raise `InvalidName`."""
    if not isinstance(seat, str) or not SEAT_PATTERN.fullmatch(seat):
        raise InvalidName("seat must be lower-case letters and '_' (e.g. x_owner)")
    return seat


def _temp_path(final: Path) -> Path:
    return final.parent / f".{final.name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}"


def leftover_temps(final: Path) -> list[Path]:
    """The temporary files an earlier `atomic_writer` of `final`, killed mid-write, left beside it."""
    own = re.compile(rf"\.{re.escape(final.name)}\.[0-9a-f]{{12}}{re.escape(_TEMP_SUFFIX)}")
    try:
        return [path for path in final.parent.iterdir() if own.fullmatch(path.name)]
    except FileNotFoundError:
        return []


def is_temp_name(name: str) -> bool:
    """True for the spool's temporary file names (never read by any stage)."""
    return name.startswith(".") and name.endswith(_TEMP_SUFFIX)


@contextlib.contextmanager
def atomic_writer(final: Path, *, overwrite: bool = True, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Yield a binary file that appears at `final` whole, or not at all, when the block ends without error.

    With `overwrite=False` an existing `final` is kept (`os.link` refuses to replace it) and the new bytes are
    discarded: the first writer wins, which is what idempotent hand-offs need.
    """
    temp = _temp_path(final)
    for attempt in range(3):
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            break
        # A consumer removed the emptied folder between our mkdir and open (FileNotFoundError), or within mkdir,
        # between its "exists" and its check that a folder is there (FileExistsError): again.
        except (FileNotFoundError, FileExistsError):
            if attempt == 2:
                raise
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temp, final)
        else:
            try:
                os.link(temp, final)
            except FileExistsError:
                pass
            os.unlink(temp)
        fsync_dir(final.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if isinstance(exc, OSError) and exc.filename is None:
            # A write or fsync the disk refused (full, read-only) names no file: name the one it was for, so the
            # programs tell the spool's refusals (said, and retried) from their own bugs (which end the program).
            raise OSError(exc.errno, exc.strerror, str(final)) from exc
        raise


def atomic_write_bytes(final: Path, data: bytes, *, overwrite: bool = True, mode: int = 0o644) -> None:
    """Write `data` to `final` atomically and durably (see `atomic_writer`)."""
    with atomic_writer(final, overwrite=overwrite, mode=mode) as handle:
        handle.write(data)


def atomic_write_json(final: Path, obj: Any, *, overwrite: bool = True) -> None:
    """Write `obj` as JSON to `final` atomically and durably."""
    atomic_write_bytes(final, json.dumps(obj, sort_keys=True).encode(), overwrite=overwrite)


def _kills_in(claim: dict[str, Any], key: str = "killed") -> int:
    """A kill count a claim holds (none in a claim of another shape)."""
    killed = claim.get(key, 0) if isinstance(claim, dict) else 0
    return killed if isinstance(killed, int) else 0


def read_json(path: Path) -> Any | None:
    """Return the JSON in `path`, or None if the file does not exist."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None


def durable_unlink(path: Path) -> None:
    """Remove `path` (if present) and make the removal durable."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


@dataclass(frozen=True)
class OutboxItem:
    """A sealed message waiting in the outbox to be put at the broker."""

    job_id: str
    to_seat: str
    name: str
    path: Path


@dataclass(frozen=True)
class StatusItem:
    """One queued status update for the poller to report to the coordinator."""

    job_id: str
    path: Path

    def read(self) -> dict[str, Any]:
        """Return the update: {"state", "progress", "message"?, "metrics"?, "model_location"?}."""
        return json.loads(self.path.read_bytes())


# Kept free on the spool volume by the messenger, which leaves a message at the broker rather than go below it.
RESERVE_BYTES = 256 * 1024**2


def mib(size: int) -> str:
    """A size as messages about the spool's room say it."""
    return f"{size / 1024**2:.0f} MiB"


class Spool:
    """The spool directory of one worker (see the module docstring for the layout)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        for sub in ("jobs", "claims", "outbox", "inbox", "rejected", "status", "results", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # Jobs seen with done.json / ended.json: both are final, so scans skip these without reading them again.
        self._seen_done: set[str] = set()
        self._seen_ended: set[str] = set()
        # What this program's waits sleep on: a short poll until `watch` starts reporting hand-offs.
        self.changes = SpoolWatch(ignore=is_temp_name)

    def free_bytes(self) -> int:
        """Free bytes on the spool's volume."""
        return shutil.disk_usage(self.root).free

    def write_refused(self) -> OSError | None:
        """Why the spool refuses a small durable write now (full, read-only), or None once one goes through: the
        poller's look, after a program found the spool refusing, whether the operator fixed it."""
        probe = self.root / "tmp" / "write-probe"
        try:
            atomic_write_bytes(probe, b"ok")
            probe.unlink()
        except OSError as exc:
            return exc
        return None

    def watch(self, *stages: str) -> bool:
        """Have `changes` wake waiters when a file lands under these stage folders (e.g. "outbox"), so idle
        loops can sleep instead of polling; False if the system refused (the short polls go on)."""
        return self.changes.start(self.root, stages)

    @contextlib.contextmanager
    def watching(self, *stages: str) -> Iterator[None]:
        """`watch(stages)` for the block; on leaving it, stop watching and release every wait (a program's main)."""
        self.watch(*stages)
        try:
            yield
        finally:
            self.changes.close()

    # ---- jobs -----------------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        """The directory of a job's spec and markers."""
        return self.root / "jobs" / validate_job_id(job_id)

    def put_job(self, spec: dict[str, Any]) -> bool:
        """Store a WorkerJob spec (poller); returns True if it is new or changed."""
        return self.store_job(spec)[0]

    def store_job(self, spec: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
        """As `put_job`, and the spec stored before (None if the job is new)."""
        path = self.job_dir(spec["id"]) / "spec.json"
        previous = read_json(path)
        if previous == spec:
            return False, previous
        atomic_write_json(path, spec)
        return True, previous

    def read_job(self, job_id: str) -> dict[str, Any] | None:
        """The stored WorkerJob spec, or None."""
        return read_json(self.job_dir(job_id) / "spec.json")

    def job_ids(self) -> list[str]:
        """Ids of the jobs with a stored spec, oldest spec first."""
        return self._job_ids(skip=set())

    def _job_ids(self, skip: set[str]) -> list[str]:
        found, present = [], set()
        with os.scandir(self.root / "jobs") as entries:
            for entry in entries:
                present.add(entry.name)
                if entry.name in skip or not JOB_ID_PATTERN.fullmatch(entry.name):
                    continue
                try:
                    found.append((os.stat(os.path.join(entry.path, "spec.json")).st_mtime_ns, entry.name))
                except (FileNotFoundError, NotADirectoryError):
                    continue
        self._seen_done &= present  # jobs another program removed (prune_finished) are forgotten here too
        self._seen_ended &= present
        return [job_id for _, job_id in sorted(found)]

    def unended_job_ids(self) -> list[str]:
        """Jobs with a spec that the coordinator has not ended (as far as this worker knows), oldest first."""
        return [j for j in self._job_ids(skip=self._seen_ended) if self.ended(j) is None]

    def mark_ended(self, job_id: str, status: str, message: str | None = None) -> None:
        """Record that the coordinator ended the job (Stopped, Error, Completed, Rejected); the runner abandons it."""
        atomic_write_json(self.job_dir(job_id) / "ended.json", {"status": status, "message": message})

    def ended(self, job_id: str) -> dict[str, Any] | None:
        """The coordinator's end of the job ({"status", "message"}), or None while it may still run."""
        record = read_json(self.job_dir(job_id) / "ended.json")
        if record is not None:
            self._seen_ended.add(job_id)
        return record

    def mark_done(self, job_id: str, outcome: str, message: str | None = None,
                  traffic: dict[str, int] | None = None) -> None:
        """Record that the runner finished its role: outcome is completed, error or abandoned; `traffic` counts the
        messages this run of the runner sealed and read (the e2e bench reports it as the bytes through the broker)."""
        record: dict[str, Any] = {"outcome": outcome, "message": message}
        if traffic is not None:
            record["traffic"] = traffic
        atomic_write_json(self.job_dir(job_id) / "done.json", record)

    def done(self, job_id: str) -> dict[str, Any] | None:
        """The runner's outcome for the job, or None if it has not finished."""
        record = read_json(self.job_dir(job_id) / "done.json")
        if record is not None:
            self._seen_done.add(job_id)
        return record

    def ended_not_done_job_ids(self) -> list[str]:
        """Jobs the coordinator ended before this worker's runner finished (or started) them."""
        return [j for j in self._job_ids(skip=self._seen_done) if self.ended(j) is not None and self.done(j) is None]

    def active_job_ids(self) -> list[str]:
        """Jobs the runner still has to run: a spec, not done, not ended by the coordinator."""
        return [j for j in self._job_ids(skip=self._seen_done | self._seen_ended)
                if self.done(j) is None and self.ended(j) is None]

    # ---- the runner's claims ---------------------------------------------------------------------------------
    def claim(self, job_id: str, working: bool = False) -> None:
        """Durably record that the runner took `job_id` (a restarted runner resumes it), and whether it holds one of
        its job slots (`working`: it loads the job's data or computes) or waits for one."""
        path = self.root / "claims" / f"{validate_job_id(job_id)}.json"
        kills = self.kill_counts(job_id)  # kept across the claim's rewrites: only the job's end clears them
        atomic_write_json(path, {"job_id": job_id, "claimed_at": time.time(), "working": working,
                                 **{key: count for key, count in kills.items() if count}})

    def count_kill(self, job_id: str, oom: bool | None = None) -> dict[str, int]:
        """Record that a runner died (not stopped) while it worked on the claimed `job_id`, `oom` whether the OOM
        killer killed it (None: unknown); the counts so far: `killed`, and of those `oom_killed` and `not_oom`."""
        path = self.root / "claims" / f"{validate_job_id(job_id)}.json"
        record = read_json(path) or {"job_id": job_id, "claimed_at": time.time(), "working": True}
        record["killed"] = _kills_in(record) + 1
        if oom is not None:
            key = "oom_killed" if oom else "not_oom"
            record[key] = _kills_in(record, key) + 1
        atomic_write_json(path, record)
        return {key: _kills_in(record, key) for key in KILL_COUNTS}

    def kills(self, job_id: str) -> int:
        """How many runners died while they worked on the claimed `job_id` (`count_kill`)."""
        return self.kill_counts(job_id)["killed"]

    def kill_counts(self, job_id: str) -> dict[str, int]:
        """`count_kill`'s counts for the claimed `job_id`."""
        record = read_json(self.root / "claims" / f"{validate_job_id(job_id)}.json") or {}
        return {key: _kills_in(record, key) for key in KILL_COUNTS}

    def runner_starts(self, oom_kills: int | None = None) -> dict[str, Any] | None:
        """Mark a runner running until `runner_stops`, with the OOM kill counter's reading at its start (`oom_kills`);
        the last runner's mark if it left one: it died (SIGKILL, OOM) rather than stopped. The mark is made at start
        and removed at the stop, not the other way round: a removal needs no room on a full volume, and a spool from
        before the mark has none, so neither turns a stop into a death."""
        path = self.root / "claims" / RUNNER_RUNNING_NAME
        try:
            last = read_json(path)
        except (OSError, ValueError):  # a mark cut short: it was there
            last = {}
        mark = {"at": time.time(), "oom_kills": oom_kills, "run": os.environ.get(RUN_ID_VARIABLE)}
        if last is None:
            atomic_write_json(path, mark)
            return None
        try:  # this runner's own reading and run, for its own death
            atomic_write_json(path, mark)
        except OSError:
            # A full volume: the last runner's mark must not stay, or this run's own deaths would read as the
            # whole worker's (another run's) and never be counted. Removed (that needs no room), this runner's
            # death goes uncounted, as when the first mark cannot be made.
            with contextlib.suppress(OSError):
                durable_unlink(path)
        return last if isinstance(last, dict) else {}

    def runner_stops(self) -> None:
        """The runner stops (SIGTERM, `docker stop`, an error of its own): its next start counts no kill."""
        durable_unlink(self.root / "claims" / RUNNER_RUNNING_NAME)

    def is_working(self, job_id: str) -> bool:
        """True while a claimed job holds one of the runner's job slots (False: it is queued for one)."""
        record = read_json(self.root / "claims" / f"{validate_job_id(job_id)}.json")
        return bool(record and record.get("working", True))  # a claim of an earlier version: it was working

    def claimed_jobs(self) -> list[str]:
        """The jobs the runner had claimed and not released (resumed first after a restart)."""
        names = [e.name.removesuffix(".json") for e in (self.root / "claims").iterdir() if e.name.endswith(".json")]
        return sorted(n for n in names if JOB_ID_PATTERN.fullmatch(n))

    def is_claimed(self, job_id: str) -> bool:
        """True while the runner works on `job_id`."""
        return (self.root / "claims" / f"{validate_job_id(job_id)}.json").exists()

    def release_claim(self, job_id: str) -> None:
        """Drop the runner's claim on `job_id` (after `mark_done`)."""
        durable_unlink(self.root / "claims" / f"{validate_job_id(job_id)}.json")

    # ---- outbox ---------------------------------------------------------------------------------------------
    def outbox_path(self, job_id: str, to_seat: str, name: str) -> Path:
        """Where the sealed message `name` for `to_seat` waits to be sent."""
        return (self.root / "outbox" / validate_job_id(job_id) / validate_seat(to_seat)
                / f"{validate_message_name(name)}.sealed")

    def outbox_has(self, job_id: str, to_seat: str, name: str) -> bool:
        """True if the message was already written (pending or sent): sending again must not re-seal it."""
        path = self.outbox_path(job_id, to_seat, name)
        return path.exists() or path.with_suffix(".sent").exists()

    def outbox_names(self, job_id: str, to_seat: str) -> list[str]:
        """Names of the messages written for `to_seat` in the job (pending or sent), in no order."""
        entries = _entries(self.root / "outbox" / validate_job_id(job_id) / validate_seat(to_seat))
        names = (entry.name.removesuffix(".sealed").removesuffix(".sent") for entry in entries
                 if entry.name.endswith((".sealed", ".sent")))
        return [name for name in names if MESSAGE_NAME_PATTERN.fullmatch(name)]

    def pending_outbox(self, job_id: str | None = None) -> list[OutboxItem]:
        """Sealed messages not yet acknowledged by the broker, oldest first."""
        items = []
        jobs = [validate_job_id(job_id)] if job_id else _subdirs(self.root / "outbox", JOB_ID_PATTERN)
        for job in jobs:
            for seat in _subdirs(self.root / "outbox" / job, SEAT_PATTERN):
                for entry in _entries(self.root / "outbox" / job / seat):
                    name = entry.name.removesuffix(".sealed")
                    if entry.name.endswith(".sealed") and MESSAGE_NAME_PATTERN.fullmatch(name):
                        with contextlib.suppress(FileNotFoundError):
                            items.append((entry.stat().st_mtime_ns, OutboxItem(job, seat, name, entry)))
        return [item for _, item in sorted(items, key=lambda pair: (pair[0], pair[1].name))]

    def mark_sent(self, item: OutboxItem) -> None:
        """The broker has the message durably: keep its name (as .sent) so a replaying runner does not seal it
        again, and free its bytes. Their pages are the ones the next message's writes reuse: on a VM, freshly
        faulted memory is most of what writing a large message costs (the e2e bench ran about 8% faster)."""
        if self.done(item.job_id) is not None:  # no replay will come: the name is not needed either
            self.discard_outbox_item(item)
            return
        sent = item.path.with_suffix(".sent")
        try:
            os.replace(item.path, sent)
            fsync_dir(item.path.parent)
            os.truncate(sent, 0)
        except FileNotFoundError:
            # The runner finished the job since the check above and removed its sent messages (discard_messages):
            # nothing is left to keep. Raised, this was an ERROR with a traceback for a message sent as it should be.
            if self.done(item.job_id) is None:
                raise
            return
        if self.done(item.job_id) is not None:
            # The runner finished between the check above and the rename: its discard_messages found this one still
            # .sealed and kept it, so the .sent name would stay (and the job's outbox folder) until housekeeping.
            self.discard_outbox_item(OutboxItem(item.job_id, item.to_seat, item.name, sent))

    def discard_outbox_item(self, item: OutboxItem) -> None:
        """Remove a sealed message nobody needs any more (sent after the runner finished, or its job ended)."""
        durable_unlink(item.path)
        self._remove_empty(item.path.parent, self.root / "outbox")

    # ---- inbox ----------------------------------------------------------------------------------------------
    def inbox_path(self, job_id: str, name: str) -> Path:
        """Where the verified plaintext of received message `name` lives until the job ends."""
        return self.root / "inbox" / validate_job_id(job_id) / f"{validate_message_name(name)}.msg"

    def inbox_names(self, job_id: str) -> list[str]:
        """Names of the messages received in the job so far, in no order."""
        names = (entry.name.removesuffix(".msg") for entry in _entries(self.root / "inbox" / validate_job_id(job_id))
                 if entry.name.endswith(".msg"))
        return [name for name in names if MESSAGE_NAME_PATTERN.fullmatch(name)]

    def record_rejection(self, job_id: str, name: str, from_seat: str, reason: str, conflict: bool = False) -> bool:
        """Note that a received message was dropped (reason without secrets), for the runner's error message; the
        first REJECTIONS_KEPT of a job only (False for one not recorded). A `conflict` is a second, different message
        the sender itself sealed and signed under a name already received: the runner fails the job on it."""
        folder = self.root / "rejected" / validate_job_id(job_id)
        path = folder / f"{validate_message_name(name)}.json"
        full = folder.is_dir() and sum(1 for _ in folder.iterdir()) >= REJECTIONS_KEPT
        if full and not conflict and not path.exists():  # a conflict fails the job: always kept
            return False
        record: dict[str, Any] = {"from_seat": from_seat, "reason": reason, "at": time.time()}
        if conflict:
            record["conflict"] = True
        atomic_write_json(path, record)
        return True

    def rejection(self, job_id: str, name: str) -> dict[str, Any] | None:
        """The record of a dropped message under `name`, or None."""
        return read_json(self.root / "rejected" / validate_job_id(job_id) / f"{validate_message_name(name)}.json")

    def rejections(self, job_id: str) -> dict[str, dict[str, Any]]:
        """Dropped messages of a job by name: {"from_seat", "reason", "at"}."""
        found = {}
        for entry in _entries(self.root / "rejected" / validate_job_id(job_id)):
            name = entry.name.removesuffix(".json")
            if entry.name.endswith(".json") and MESSAGE_NAME_PATTERN.fullmatch(name):
                record = read_json(entry)
                if record is not None:
                    found[name] = record
        return found

    # ---- status updates -------------------------------------------------------------------------------------
    def put_status(self, job_id: str, update: dict[str, Any], source: str = "runner") -> Path:
        """Queue a status update ({"state", "progress", ...}) for the poller; later updates sort later."""
        if not re.fullmatch(r"[a-z]{1,16}", source):
            raise InvalidName("status source must be a short lower-case program name")
        # After the wall clock stepped back (NTP, a resumed VM), an update still sorts after those queued before it.
        stamp = max([time.time_ns(), *(int(name[:20]) + 1 for name in self._queued_status(job_id))])
        path = self.root / "status" / job_id / f"{stamp:020d}-{source}-{secrets.token_hex(4)}.json"
        atomic_write_json(path, update)
        return path

    def note_reported(self, job_id: str, update: dict[str, Any]) -> None:
        """Keep the seat's final report (completed or error) once the coordinator took it."""
        atomic_write_json(self.job_dir(job_id) / "reported.json", update)

    def reported(self, job_id: str) -> dict[str, Any] | None:
        """The seat's final report as the coordinator took it, or None."""
        return read_json(self.job_dir(job_id) / "reported.json")

    def has_pending_status(self, job_id: str) -> bool:
        """Whether a status update of the job waits to be reported."""
        return bool(self._queued_status(job_id))

    def _queued_status(self, job_id: str) -> list[str]:
        """The names of the job's queued status updates."""
        try:
            return [entry.name for entry in (self.root / "status" / validate_job_id(job_id)).iterdir()
                    if _STATUS_NAME.fullmatch(entry.name)]
        except FileNotFoundError:
            return []

    def pending_status(self) -> list[StatusItem]:
        """Queued status updates of all jobs, in the order they were written."""
        items = []
        for job in _subdirs(self.root / "status", JOB_ID_PATTERN):
            for entry in _entries(self.root / "status" / job):
                if _STATUS_NAME.fullmatch(entry.name):
                    items.append(StatusItem(job, entry))
        return sorted(items, key=lambda item: item.path.name)

    def ack_status(self, item: StatusItem) -> None:
        """The coordinator has the update (or refused it for good): drop it from the queue."""
        durable_unlink(item.path)
        self._remove_empty(item.path.parent, self.root / "status")

    # ---- results --------------------------------------------------------------------------------------------
    def result_path(self, job_id: str) -> Path:
        """Where the output seat's result (weights, metrics) waits for the uploader."""
        return self.root / "results" / validate_job_id(job_id) / "result.json"

    def put_result(self, job_id: str, result: dict[str, Any]) -> None:
        """Hand the result to the uploader: {"job_id", "weights", "x_columns", "metrics", "model_location"}."""
        atomic_write_json(self.result_path(job_id), result)

    def pending_results(self) -> list[str]:
        """Ids of jobs whose result waits for the uploader."""
        return [j for j in _subdirs(self.root / "results", JOB_ID_PATTERN) if self.result_path(j).is_file()]

    def read_result(self, job_id: str) -> dict[str, Any] | None:
        """The result waiting for the uploader, or None."""
        return read_json(self.result_path(job_id))

    def ack_result(self, job_id: str, failed: bool = False) -> None:
        """The uploader has stored the result (or failed for good) and queued its status: keep it as
        jobs/<job>/uploaded.json (upload-failed.json), out of the folder the uploader scans."""
        path = self.result_path(job_id)
        if path.exists():
            uploaded = self.job_dir(job_id) / ("upload-failed.json" if failed else "uploaded.json")
            uploaded.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, uploaded)
            fsync_dir(uploaded.parent)
            fsync_dir(path.parent)
        self._remove_empty(path.parent, self.root / "results")

    def move_old_upload_records(self) -> int:
        """Move the records of stored results an older version kept as results/<job>/uploaded.json to where they
        are kept now (jobs/<job>/, or gone with a job no longer kept), out of the folder the uploader scans at
        every change; returns how many moved."""
        moved = 0
        for job_id in _subdirs(self.root / "results", JOB_ID_PATTERN):
            old = self.result_path(job_id).with_name("uploaded.json")
            if self.result_path(job_id).exists() or not old.is_file():
                continue
            if self.job_dir(job_id).is_dir():
                os.replace(old, self.job_dir(job_id) / "uploaded.json")
                fsync_dir(self.job_dir(job_id))
            else:  # its job's records were pruned: nothing refers to it
                old.unlink()
            self._remove_empty(old.parent, self.root / "results")
            moved += 1
        return moved

    def uploaded(self, job_id: str) -> bool:
        """True once the uploader stored the job's result (also as kept by older versions, under results/)."""
        return ((self.job_dir(job_id) / "uploaded.json").exists()
                or self.result_path(job_id).with_name("uploaded.json").exists())

    def upload_failed(self, job_id: str) -> bool:
        """True once the uploader gave up on the job's result (the job's error says why)."""
        return (self.job_dir(job_id) / "upload-failed.json").exists()

    # ---- housekeeping ---------------------------------------------------------------------------------------
    def unsent_count(self, job_id: str) -> int:
        """How many sealed messages of the job still wait for the broker."""
        return len(self.pending_outbox(job_id))

    def discard_messages(self, job_id: str) -> None:
        """Remove a finished job's received and sent messages (pending outgoing ones are kept).

        Rejection records stay in rejected/<job>/: they are the audit trail of tampering (small, no content).
        """
        job = validate_job_id(job_id)
        shutil.rmtree(self.root / "inbox" / job, ignore_errors=True)
        outbox = self.root / "outbox" / job
        if outbox.is_dir():
            for sent in outbox.glob("*/*.sent"):
                sent.unlink(missing_ok=True)
            for seat in _subdirs(outbox, SEAT_PATTERN):
                self._remove_empty(outbox / seat, self.root / "outbox")

    @staticmethod
    def _remove_empty(folder: Path, stage: Path) -> None:
        """Remove `folder` and then its parents below `stage` while they are empty (a writer that loses the race
        makes its folder again: see `atomic_writer`)."""
        while folder != stage and stage in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (still in use), or already gone
                return
            folder = folder.parent

    def prune_finished(self, keep: int | None = None) -> list[str]:
        """Remove the records of finished jobs beyond the `keep` (FINISHED_JOBS_KEPT) most recently finished;
        returns their ids.

        Finished: the runner is done, the coordinator ended it, and nothing of it waits in any stage (no claim,
        outbox, inbox, status or result), so no program touches it again.
        """
        finished = []
        for job_id in self._job_ids(skip=set()):
            done = job_id in self._seen_done or self.done(job_id) is not None
            if not done or not (job_id in self._seen_ended or self.ended(job_id) is not None):
                continue
            if self.is_claimed(job_id):
                continue
            # What a crash or a race left behind once the runner was done (received messages, .sent names, empty
            # folders) goes too; a message still to send, a status still to report or a result to upload keeps it.
            self.discard_messages(job_id)
            stages = [self.root / stage / job_id for stage in ("outbox", "inbox", "status", "results")]
            for folder in stages:
                self._remove_empty(folder, folder.parent)
            if any(folder.exists() for folder in stages):
                continue
            with contextlib.suppress(FileNotFoundError):
                finished.append(((self.job_dir(job_id) / "ended.json").stat().st_mtime_ns, job_id))
        finished.sort()
        keep = FINISHED_JOBS_KEPT if keep is None else keep
        removed = [job_id for _, job_id in finished[:max(0, len(finished) - keep)]]
        for job_id in removed:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            shutil.rmtree(self.root / "rejected" / job_id, ignore_errors=True)
            self._seen_done.discard(job_id)
            self._seen_ended.discard(job_id)
        return removed

    def sweep_temp(self, older_than: float = 3600.0) -> int:
        """Remove temporary files left by crashed writers (old enough not to be in use); returns the count."""
        cutoff = time.time() - older_than
        removed = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                path = Path(dirpath) / name
                if is_temp_name(name):
                    with contextlib.suppress(FileNotFoundError):
                        if path.stat().st_mtime < cutoff:
                            path.unlink()
                            removed += 1
        return removed

    def remove_scratch(self, prefix: str) -> int:
        """Remove tmp/ files named `prefix...` (a program's scratch files, left by its kill -9: a download of the
        organization's data, say); call only from the program that makes them, at its start. Returns the count."""
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for entry in (self.root / "tmp").iterdir():
                if entry.name.startswith(prefix) and is_temp_name(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
                        removed += 1
        return removed

    def temp_file(self, suffix: str = "") -> Path:
        """A fresh path under tmp/ for a program's scratch file (e.g. a download in progress)."""
        return self.root / "tmp" / f"{SCRATCH_PREFIX}{secrets.token_hex(8)}{suffix}{_TEMP_SUFFIX}"


def _subdirs(folder: Path, pattern: re.Pattern[str]) -> list[str]:
    return sorted(e.name for e in _entries(folder) if pattern.fullmatch(e.name) and e.is_dir())


def _entries(folder: Path) -> list[Path]:
    """What `folder` holds; nothing once it is gone. Another program removes the folders it empties (`_remove_empty`)
    at any moment, also between a check that one is there and its listing: a runner ending a job while the
    messenger emptied the job's outbox logged that it could not record the job's end."""
    try:
        return list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
