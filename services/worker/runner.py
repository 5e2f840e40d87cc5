"""The runner program: runs this worker's role of each approved job, over the spool.

For each job the poller put in the spool the runner writes a claim (which survives its own restart), loads this
organization's dataview, derives the job's seeds from the worker keys, and runs `run_party` over a `SpoolTransport`.
A restarted runner resumes its claimed jobs and replays its role from the start: the run is deterministic, sent
messages are not re-sealed and received ones wait in the inbox, so it catches up and sends the same bytes.
Status updates go to the spool for the poller; the output seat's weights and metrics go to the spool for the
uploader, which reports completion once the model is stored. Bad data or a failed protocol becomes an error status
with a readable message. A job the coordinator ended (the poller marks it) is abandoned.

Jobs run in parallel threads: two workers must never wait on each other for different jobs. A job takes its seat
(claims it and reports `started`) at once, then waits for one of `MAX_PARALLEL_JOBS` slots before it loads its
data (`job_slots`: a job whose partner is not running holds no slot another job needs). From taking its seat until
its first protocol message goes out, its partners get keep-alives saying it is still preparing and what it does
(`keepalive`), so they wait for it beyond the job's timeout; its own waits say why they last when a partner is late.

Run as `python -m services.worker.runner`. SIGTERM pauses the running jobs (their claims stay, so they resume on
restart) and waits up to `STOP_JOIN_SECONDS` for their threads to leave cleanly.
"""
from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from services.jobs.linear_regression import JobDataError, LinearRegressionTask, ProtocolError, run_party
from services.memory_reuse import release_freed_memory
from services.jobs.linear_regression.errors import MissingColumnError
from services.mpc import ProtocolError as EngineProtocolError
from services.worker import health
from services.worker.dataview import (DownloadWatch, S3ClientFactory, default_s3_client, load_dataview,
                                      s3_client_config)
from services.worker.disk_advice import disk_advice
from services.worker.job_slots import JobSlots
from services.worker.job_spec import JobSpec, JobSpecError
from services.worker.keepalive import KeepAlives
from services.worker.keys import WorkerKeys
from services.worker.memory_cgroup import oom_kill_count, oom_kills_since
from services.worker.resource_limits import shortage
from services.worker.runner_deaths import MAX_KILLS_PER_JOB, died_with_the_whole_worker, kill_cause, killed_message
from services.worker.seat_record import (ENDED_MESSAGE, LOST_ERROR, LOST_LOG, LOST_NOTE, SEAT_ENDED,
                                        seat_taken_before)
from services.worker.seeds import party_seeds
from services.worker.spool import SCRATCH_PREFIX, Spool
from services.worker.spool_transport import JobInterrupted, SpoolTransport
from services.worker.uploader import UploadError, model_bucket

if TYPE_CHECKING:  # the programs read their configuration only in main()
    from pathlib import Path

    from services.worker.config import WorkerConfig

log = logging.getLogger("cape.runner")
SCAN_SECONDS = 0.05  # without a spool watch, how soon a job the poller stored starts (a scan is one listing)
PROGRESS_EVERY_SECONDS = 1.0
RESUMED_NOTE = "replaying its role after a restart"
TAKING_A_SLOT = "taking one of its worker's job slots"  # the phases its keep-alives say before it holds a slot
LOADING = "loading its data"  # ... while it loads its data, before the download (if any) says how far it is
STARTING = "starting its seat of the protocol"  # ... once its data is loaded
MAX_PARALLEL_JOBS = 4  # jobs loading their data or computing at once (job_slots.py)
MAX_JOB_THREADS = 64  # jobs taken at once, most of them waiting for a slot (a waiting thread costs little)
SLOT_POLL_SECONDS = 1.0  # a job waiting for a slot looks again after this without a spool change
LOAD_SAID_EVERY_SECONDS = 5.0  # a dataview download's progress on the seat
LOAD_LOGGED_EVERY_SECONDS = 30.0  # ... and in the runner's log
STARTED_RECHECK_SECONDS = 0.2  # how stale a waiting job's "Started" may be when slots are handed out
QUEUED_SAID_AFTER_SECONDS = 1.0  # a wait for the other workers shorter than this is not reported
# Idle this long after a job, the runner gives back the memory it kept for reuse (its largest job's peak, for the
# days an appliance may idle); a job that follows sooner finds its heap warm.
IDLE_RELEASE_SECONDS = 60.0
STOP_JOIN_SECONDS = 2.0  # inside supervisord's stopwaitsecs for the runner (7)
CLAIM_RETRY_SECONDS = 10.0  # a job the spool refused to claim (a full or read-only volume) is tried again after this
_STOPPING = "the runner is stopping"


class JobFailed(Exception):
    """The job cannot finish at this worker; the message is what the coordinator shows, `own` (if given) what this
    worker's own log says instead: with what only its organization may see (its dataview's location, a header)."""

    def __init__(self, message: str, own: str | None = None) -> None:
        super().__init__(message)
        self.own = own


class Runner:
    """Runs the spool's jobs, one thread per job, until `stop` is set."""

    def __init__(
        self,
        spool: Spool,
        keys: WorkerKeys,
        stop: threading.Event | None = None,
        s3_client: S3ClientFactory = default_s3_client,
        max_parallel: int = MAX_PARALLEL_JOBS,
        model_bucket: Callable[[JobSpec], object] | None = None,
        run_dir: Path | None = None,
    ) -> None:
        """`model_bucket(spec)` raises the uploader's `UploadError` when this worker could not store the model of a
        job whose output seat it holds: said before the job's data is loaded, not after the whole computation.
        `run_dir` holds the messenger's records of its own troubles, which a wait that ends quotes."""
        self.spool = spool
        self.run_dir = run_dir
        self.model_bucket = model_bucket
        self.keys = keys
        self.stop = stop or threading.Event()
        self.s3_client = s3_client
        self.slots = JobSlots(max_parallel, self._all_seats_taken)
        self.keepalives = KeepAlives(spool, keys, self.stop)
        self._started_seen: dict[str, tuple[float, bool]] = {}  # job -> (when read, Started), for the slots
        self._threads: dict[str, threading.Thread] = {}
        self._idle_since: float | None = None  # when the last job thread ended, until memory is released
        self._claim_refused: set[str] = set()  # jobs whose claim the spool refused, said once until it works
        self._lost_record: set[str] = set()  # jobs taken by a runner whose spool is gone (seat_record.py)

    # ---- scheduling -----------------------------------------------------------------------------------------
    def count_kills(self) -> None:
        """At start: if the last runner left its mark, it died (SIGKILL, OOM) while its working jobs ran; count that
        against each (`MAX_KILLS_PER_JOB`) and say it, with its cause where the memory cgroup's counter tells it."""
        oom_now = oom_kill_count()
        try:
            last = self.spool.runner_starts(oom_now)
        except OSError as exc:  # a full volume: this runner's own death would go uncounted, nothing worse
            log.warning("cannot mark the runner running in the spool (%s); a kill of this runner is not counted "
                        "against its jobs", exc.strerror or exc)
            return
        if last is None:
            return
        if died_with_the_whole_worker(last):
            for job_id in filter(self.spool.is_working, self.spool.claimed_jobs()):
                log.warning("job %s: the whole worker stopped while its runner worked on this job, without a clean "
                            "stop (docker kill, a power loss, its supervisord killed): not counted as a death of the "
                            "runner; the job is replayed", job_id)
            return
        oom_kills = oom_kills_since(last.get("oom_kills"), oom_now)
        oom = None if oom_kills is None else oom_kills > 0
        for job_id in self.spool.claimed_jobs():
            if self.spool.is_working(job_id):
                try:
                    kills = self.spool.count_kill(job_id, oom)["killed"]
                except OSError as exc:  # a full volume: the runner still starts, and says why it waits
                    log.warning("job %s: the last runner was killed while it worked on this job; the spool refuses "
                                "to count it (%s): %s", job_id, exc.strerror or exc,
                                disk_advice(exc, "CAPE_SPOOL_DIR"))
                    continue
                log.warning("job %s: the last runner was killed while it worked on this job (%d of %d times before "
                            "the job ends in Error), %s; %s", job_id, kills, MAX_KILLS_PER_JOB, kill_cause(oom_kills),
                            "it ends now" if kills >= MAX_KILLS_PER_JOB else "the job is replayed")

    def runnable(self) -> list[str]:
        """Jobs to run: claimed ones first (a restart resumes them), then active ones oldest approval first."""
        active = set(self.spool.active_job_ids())
        claimed = [j for j in self.spool.claimed_jobs() if j in active]
        for job_id in self.spool.claimed_jobs():
            if job_id not in active and job_id not in self._threads:
                self.spool.release_claim(job_id)  # ended or done while we were down
        for job_id in self.spool.ended_not_done_job_ids():
            ended = self.spool.ended(job_id) or {}
            if job_id not in self._threads:
                # Ended by the coordinator before this runner finished (or started) it: close it here too.
                self.spool.mark_done(job_id, "abandoned", f"the coordinator ended the job ({ended.get('status')})")
                self.spool.discard_messages(job_id)

        def order(job_id: str) -> tuple[str, str]:
            spec = self.spool.read_job(job_id) or {}
            return (str(spec.get("approved_at") or ""), job_id)

        return claimed + sorted(active - set(claimed), key=order)

    def start_due(self) -> None:
        """Start a thread for each runnable job not yet running, up to `MAX_JOB_THREADS`; once no job has run for
        IDLE_RELEASE_SECONDS, hand the memory the last ones freed back to the system."""
        for job_id, thread in list(self._threads.items()):
            if not thread.is_alive():
                del self._threads[job_id]
                self._started_seen.pop(job_id, None)
                self._idle_since = time.monotonic()
        if (not self._threads and self._idle_since is not None
                and time.monotonic() - self._idle_since >= IDLE_RELEASE_SECONDS):
            self._idle_since = None  # once per idle spell: back-to-back jobs keep their warm heap
            release_freed_memory()
        for job_id in self.runnable():
            if len(self._threads) >= MAX_JOB_THREADS:
                break
            if job_id not in self._threads:
                thread = threading.Thread(target=self.run_job, args=(job_id,), name=f"job-{job_id[:8]}", daemon=True)
                self._threads[job_id] = thread
                thread.start()

    def run(self) -> None:
        """Count a kill of the last runner against its jobs, start jobs as they appear until stopped, then give the
        job threads `STOP_JOIN_SECONDS` to stop."""
        try:
            self.count_kills()
            while not self.stop.is_set():
                seen = self.spool.changes.generation
                self.start_due()
                self.spool.changes.wait(seen, SCAN_SECONDS)
        finally:
            # Also when SIGTERM's SystemExit ends the loop: the process exits without finalizing (process_exit),
            # so a job thread not joined here dies mid-step, e.g. between marking its job done and removing its
            # received messages.
            self.stop.set()
            self.spool.changes.wake()  # a job waiting for a message sees the stop now
            deadline = time.monotonic() + STOP_JOIN_SECONDS
            for thread in list(self._threads.values()):
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            try:  # a stop, not a death: the next runner counts no kill against the jobs it resumes
                self.spool.runner_stops()
            except OSError as exc:
                log.warning("cannot remove the runner's mark from the spool (%s); its next start counts a kill "
                            "against the jobs it resumes", exc.strerror or exc)

    # ---- one job --------------------------------------------------------------------------------------------
    def run_job(self, job_id: str) -> str:
        """Run this worker's role of `job_id` to its end here; returns the outcome (completed/error/abandoned/...)."""
        # Worked on by a runner that did not finish it (a restart): its role is replayed.
        resumed = self.spool.is_working(job_id)  # False without a claim
        # Taken by a runner whose spool is gone (seat_record.py): a seat that ended is not run again, where a
        # replay could only wait for messages acknowledged long ago and end a job its partners complete in Error.
        taken = seat_taken_before(self.spool, job_id)
        if taken in SEAT_ENDED:
            message = ENDED_MESSAGE.format(state=taken)
            log.warning("job %s: %s", job_id, message)
            return "abandoned" if self._record_end(job_id, "abandoned", message, None) else "waiting"
        if taken is not None:
            log.error(LOST_LOG, job_id, taken)
            self._lost_record.add(job_id)
        if not self._claim(job_id, working=resumed):
            return "waiting"
        traffic: dict[str, int] | None = None
        logged: str | None = None
        try:
            outcome, message, traffic = self._run(job_id, resumed)
        except JobInterrupted as exc:
            if str(exc) == _STOPPING:
                log.info("job %s: paused (the runner is stopping); it resumes on restart", job_id)
                return "paused"
            outcome, message = "abandoned", str(exc)
            log.info("job %s: abandoned: %s", job_id, exc)
        except JobFailed as exc:
            outcome, message, logged = "error", str(exc), exc.own
        except Exception as exc:  # noqa: BLE001 - any failure must end as a readable error status, not a hang
            outcome, message = "error", _unexpected_failure(job_id, exc)
        if outcome == "error" and job_id in self._lost_record:  # most likely a wait for a message the lost spool had
            message = f"{message} ({LOST_ERROR})"
        return outcome if self._record_end(job_id, outcome, message, traffic, logged) else "waiting"

    def _claim(self, job_id: str, working: bool = False) -> bool:
        """Claim the job in the spool; False (said once, after a pause) if the spool refuses the write. The thread
        stays alive through the pause, so the scan does not start the job again at once."""
        try:
            self.spool.claim(job_id, working)  # a resumed job keeps its mark until it holds a slot again
        except OSError as exc:  # the job has not started: nothing to report but the reason
            if job_id not in self._claim_refused:
                self._claim_refused.add(job_id)
                log.error("job %s: cannot claim it in the spool (%s); %s; trying again every %.0f s", job_id,
                          exc.strerror or exc, disk_advice(exc, "CAPE_SPOOL_DIR"), CLAIM_RETRY_SECONDS)
            self._spool_refused(exc)
            self.stop.wait(CLAIM_RETRY_SECONDS)
            return False
        if job_id in self._claim_refused:
            self._claim_refused.discard(job_id)
            log.info("job %s: claimed; the spool takes writes again", job_id)
        return True

    def _record_end(self, job_id: str, outcome: str, message: str | None, traffic: dict[str, int] | None,
                    logged: str | None = None) -> bool:
        """Report an error (`logged` in this worker's log, if given, else the report), mark the job done, release
        it; False (after a pause) if the spool refuses the writes: still claimed, the job is replayed once the spool
        takes writes again, not in a tight loop."""
        try:
            if outcome == "error":
                log.error("job %s: error: %s", job_id, logged or message)
                self.spool.put_status(job_id, {"state": "error", "progress": 0.0, "message": message})
            self.spool.mark_done(job_id, outcome, message, traffic)
            self.spool.release_claim(job_id)
            self.spool.discard_messages(job_id)
        except OSError as exc:
            log.error("job %s: cannot record its end in the spool (%s); %s; the job is taken up again in %.0f s",
                      job_id, exc.strerror or exc, disk_advice(exc, "CAPE_SPOOL_DIR"), CLAIM_RETRY_SECONDS)
            self._spool_refused(exc)
            self.stop.wait(CLAIM_RETRY_SECONDS)
            return False
        return True

    def _spool_refused(self, exc: OSError) -> None:
        """Record for `health` and `status` that the spool refuses the runner's writes (the poller clears it)."""
        health.SPOOL_REFUSES_WRITES.note(self.run_dir, f"the runner cannot write {exc.filename or 'the spool'} "
                                                       f"({exc.strerror or exc})", log)

    def _run(self, job_id: str, resumed: bool = False) -> tuple[str, str | None, dict[str, int]]:
        """Run the role; (outcome, message, the transport's traffic), or raise JobFailed / JobInterrupted."""
        if (kills := self.spool.kill_counts(job_id))["killed"] >= MAX_KILLS_PER_JOB:
            raise JobFailed(killed_message(kills))
        try:
            spec = JobSpec.parse(self.spool.read_job(job_id) or {})
        except JobSpecError as exc:
            raise JobFailed(str(exc)) from None
        if spec.type != "linear_regression":
            raise JobFailed(f"this worker cannot run jobs of type {spec.type!r}; upgrade the worker image")
        mine = spec.parties[spec.seat]
        if (_raw(mine.encryption_key) != _raw(self.keys.encryption.public_key())
                or _raw(mine.signing_key) != _raw(self.keys.signing.public_key())):
            raise JobFailed(f"the coordinator holds other public keys for the {spec.seat} worker than this worker's "
                            "own: another worker started with this organization's token registered its keys, or "
                            "CAPE_STATE_DIR was replaced; run one worker per organization, restart it (it "
                            "registers its keys when it starts) and submit the job again")
        if spec.seat == spec.outputs_to and self.model_bucket is not None:
            try:
                self.model_bucket(spec)
            except UploadError as exc:
                log.error("job %s: %s", job_id, exc)
                raise JobFailed(f"the model owner's worker could not store the model: {exc.public}; its "
                                "operator sets CAPE_BUCKET, or the job is submitted again with a model location "
                                "s3://bucket[/prefix]") from None
        log.info("job %s: running seat %s (party %d)", job_id, spec.seat, spec.index)
        # A resumed role starts again from 0 % and catches up: say why, so its progress going back is no surprise.
        note = LOST_NOTE if job_id in self._lost_record else RESUMED_NOTE if resumed else None
        self.spool.put_status(job_id, {"state": "started", "progress": 0.0, **({"message": note} if note else {})})

        self.keepalives.begin(spec, _phase(note, TAKING_A_SLOT))
        try:
            self._wait_for_a_slot(spec, note, resumed)
            try:
                return self._run_role(spec, note)
            finally:
                self.slots.leave(job_id)
                self.spool.changes.wake()  # a job waiting for the slot looks now
        finally:
            self.keepalives.end(job_id)

    def _all_seats_taken(self, job_id: str) -> bool:
        """Whether the coordinator showed the job Started (its three workers took it) when the poller last looked.
        Asked of every waiting job at each decision, and decisions follow every spool change: a job's spec is read
        again at most every `STARTED_RECHECK_SECONDS` (dozens of queued jobs made thousands of reads a job)."""
        now = time.monotonic()
        known = self._started_seen.get(job_id)
        if known is None or (not known[1] and now - known[0] >= STARTED_RECHECK_SECONDS):
            known = (now, (self.spool.read_job(job_id) or {}).get("status") == "Started")
            self._started_seen[job_id] = known
        return known[1]

    def _wait_for_a_slot(self, spec: JobSpec, note: str | None, resumed: bool) -> None:
        """Wait until the job may load its data (`JobSlots`), saying at the coordinator why it waits when it does
        for more than a moment; raise JobInterrupted if the runner stops or the coordinator ends the job meanwhile."""
        said: str | None = None
        since = time.monotonic()
        alone = self.spool.kills(spec.id) > 0  # to tell whether it, or a job beside it, took the memory
        try:
            while True:
                if reason := self._interrupted(spec.id):
                    raise JobInterrupted(reason)
                seen = self.spool.changes.generation
                waiting = self.slots.take(spec.id, spec.approved_at or "", resumed, alone=alone)
                if waiting is None:
                    break
                self.keepalives.phase(spec.id, _phase(note, waiting.message))
                if waiting.message != said and (waiting.all_busy or
                                                 time.monotonic() - since >= QUEUED_SAID_AFTER_SECONDS):
                    said = waiting.message
                    log.info("job %s: %s", spec.id, said)
                    self.spool.put_status(spec.id, {"state": "started", "progress": 0.0,
                                                    "message": ": ".join(filter(None, (note, said)))})
                self.spool.changes.wait(seen, SLOT_POLL_SECONDS)
            self.spool.claim(spec.id, working=True)
            if said:  # its seat no longer says queued
                self.spool.put_status(spec.id, {"state": "started", "progress": 0.0,
                                                **({"message": note} if note else {})})
        except BaseException:
            self.slots.leave(spec.id)
            raise

    def _run_role(self, spec: JobSpec, note: str | None) -> tuple[str, str | None, dict[str, int]]:
        """Load the data and run the role, holding a slot; as `_run`."""
        job_id = spec.id
        task = LinearRegressionTask(tuple(spec.x_columns), spec.y_column, spec.outputs_to)
        uri: str | None = None
        progress = _Progress(self.spool, job_id, note)
        # Closed (queued sends written) before run_job marks the job done and releases the claim, whatever happens:
        # a party that stops the job sends its status message first.
        with SpoolTransport(self.spool, spec, self.keys, interrupted=lambda: self._interrupted(job_id),
                            sending=lambda: self.keepalives.end(job_id),
                            partner_preparing=partial(self._partner_preparing, spec, progress),
                            own_trouble=self._messenger_trouble,
                            own_trouble_changed=partial(self._own_trouble_changed, progress)) as transport:
            try:
                uri = spec.data_uri()
                started = time.monotonic()
                self.keepalives.phase(job_id, _phase(note, LOADING))
                data = self._load(spec, uri, note)
                if data is not None:  # the shape is public to the job's parties; the values are never logged
                    log.info("job %s: loaded its data (%s) in %.2f s", job_id,
                             " x ".join(str(n) for n in data.shape), time.monotonic() - started)
                self.keepalives.phase(job_id, _phase(note, STARTING))
                seeds = party_seeds(self.keys.encryption, {p.index: p.encryption_key for p in spec.parties.values()},
                                    spec.id, spec.index)
                result = run_party(spec.index, task, data, transport, seeds, progress, data_name=uri)
                transport.flush()  # every message durable before the result or `completed` is written
                transport.check_partner()  # a second, different message from a partner: no result to trust
            except MissingColumnError as exc:  # the full header stays in this organization's own log
                raise JobFailed(_without_uri(exc.for_other_parties(), uri, spec),
                                own=_with_uri(str(exc), uri, spec)) from None
            except (JobDataError, ProtocolError, EngineProtocolError, JobSpecError) as exc:
                raise JobFailed(_without_uri(str(exc), uri, spec), own=_with_uri(str(exc), uri, spec)) from None
        traffic = transport.traffic()
        log.info("job %s: role finished (%d messages sent, %d bytes; %d received)", job_id, traffic["messages_sent"],
                 traffic["bytes_sent"], traffic["messages_received"])
        if result is None:
            self.spool.put_status(job_id, {"state": "completed", "progress": 1.0})
            return "completed", None, traffic
        weights = np.asarray(result.weights, dtype=np.float64)
        if not (self.spool.uploaded(job_id) or self.spool.upload_failed(job_id)):  # a replay: it was handed over
            self.spool.put_result(job_id, {
                "job_id": job_id,
                "x_columns": spec.x_columns,
                "weights": [float(w) for w in weights],
                "metrics": {k: float(v) for k, v in result.metrics.items()},
                "model_location": spec.task.get("model_location"),
            })
        # Completion is the uploader's to report, once the model is stored where the model owner reads it.
        self.spool.put_status(job_id, {"state": "running", "progress": 0.99, "message": "uploading the model"})
        return "completed", None, traffic

    def _partner_preparing(self, spec: JobSpec, progress: _Progress, seat: str, phase: str | None,
                           waited: float) -> None:
        """A wait for `seat`'s message goes on past the job's timeout: that worker said it is still preparing."""
        text = f"waiting for the {seat} worker, still preparing" + (f" ({phase})" if phase else "")
        log.info("job %s: %s; waited %.0f s so far", spec.id, text, waited)
        progress.say(text)

    @staticmethod
    def _own_trouble_changed(progress: _Progress, seat: str, trouble: str | None, waiting: bool) -> None:
        """A long wait for `seat`'s message, and this worker's messenger reports trouble (or no longer does): the
        seat says it, so that the people following the job see which worker holds it up (the log has it already).
        Once the wait ends, the seat says again what it said before."""
        if not waiting:
            progress.resume()
        elif trouble:
            progress.say(f"waiting for the {seat} worker; meanwhile this worker's messenger reports: {trouble}")
        else:
            progress.say(f"waiting for the {seat} worker")

    def _load(self, spec: JobSpec, uri: str | None, note: str | None = None) -> np.ndarray | None:
        if uri is None:
            return None
        watch = _LoadWatch(self.spool, spec.id, lambda: self._interrupted(spec.id),
                           lambda text: self.keepalives.phase(spec.id, _phase(note, text)))
        if spec.seat == "x_owner":
            return load_dataview(uri, x_columns=spec.x_columns, spool=self.spool, s3_client=self.s3_client,
                                 watch=watch)
        return load_dataview(uri, y_column=spec.y_column, spool=self.spool, s3_client=self.s3_client, watch=watch)

    def _messenger_trouble(self) -> str | None:
        """What this worker's messenger records against the broker and the spool, for a wait's timeout message."""
        return health.messenger_trouble(self.run_dir, self.spool.free_bytes())

    def _interrupted(self, job_id: str) -> str | None:
        if self.stop.is_set():
            return _STOPPING
        ended = self.spool.ended(job_id)
        if ended is not None:
            return f"the coordinator ended the job ({ended.get('status')})"
        return None


def _phase(note: str | None, text: str) -> str:
    """A seat's phase as its keep-alives say it: what it does, after the resumed note if any."""
    return ": ".join(filter(None, (note, text)))


def _without_uri(message: str, uri: str | None, spec: JobSpec) -> str:
    """The message with this seat's dataview uri replaced by the dataview's name.

    Job errors are shown to every member of the project, and a dataview's uri is for its owner's eyes only.
    """
    if not uri:
        return message
    part = {"x_owner": "x", "y_owner": "y"}.get(spec.seat, "")
    name = ((spec.task.get(part) or {}).get("dataview") or {}).get("name") or part
    return message.replace(uri, f"dataview {name!r}")


def _with_uri(message: str, uri: str | None, spec: JobSpec) -> str | None:
    """The message for this organization's own log: the dataview named, and where it is (its operator's next look
    is at that file; "dataview 'features': no such file" left them to find its uri at the coordinator). None if the
    message does not quote the uri."""
    if not uri or uri not in message:
        return None
    return message.replace(uri, f"{_without_uri(uri, uri, spec)} ({uri})")


class _LoadWatch(DownloadWatch):
    """A dataview download's progress and retries, on the seat (every `LOAD_SAID_EVERY_SECONDS`) and in the log
    (every `LOAD_LOGGED_EVERY_SECONDS`): a slow store looked like a hung one for minutes. Stops the download once
    the runner stops or the coordinator ends the job (it went on for 44 s after a stop). What it says on the seat
    goes to `said` too (the job's keep-alives)."""

    def __init__(self, spool: Spool, job_id: str, interrupted: Callable[[], str | None],
                 said: Callable[[str], None] = lambda text: None) -> None:
        self.spool = spool
        self.job_id = job_id
        self.interrupted = interrupted
        self.said = said
        self.said_at = self.logged_at = time.monotonic()

    def received(self, done: int, total: int | None) -> None:
        if reason := self.interrupted():
            raise JobInterrupted(reason)
        now = time.monotonic()
        if now - self.said_at < LOAD_SAID_EVERY_SECONDS:
            return
        self.said_at = now
        of = f" of {total / 2**20:.0f}" if total else ""
        text = self._say(f"{done / 2**20:.0f}{of} MiB")
        if now - self.logged_at >= LOAD_LOGGED_EVERY_SECONDS:
            self.logged_at = now
            log.info("job %s: %s", self.job_id, text)

    def retrying(self, reason: str, delay: float) -> None:
        log.warning("job %s: loading its data: %s; trying again in %.0f s", self.job_id, reason, delay)
        self._say(f"{reason}; trying again")

    def _say(self, how_far: str) -> str:
        """`loading its data: <how_far>` on the seat and in the keep-alives; returns that text."""
        text = f"{LOADING}: {how_far}"
        self.said(text)
        self.spool.put_status(self.job_id, {"state": "running", "progress": 0.0, "message": text})
        return text


class _Progress:
    """The engine's progress callback: queue `running` updates for the poller, at most about once a second."""

    def __init__(self, spool: Spool, job_id: str, note: str | None = None) -> None:
        self.spool = spool
        self.job_id = job_id
        self.note = note
        self.last_at = 0.0
        self.last_fraction = -1.0
        self.last_message: str | None = None  # what the last progress update said (`resume` says it again)

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        numbers = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        fraction = kwargs.get("fraction", kwargs.get("progress", numbers[0] if numbers else None))
        phase = kwargs.get("phase") or next((a for a in args if isinstance(a, str)), None)
        if fraction is None:
            return
        fraction = max(0.0, min(0.98, float(fraction)))  # 1.0 is for the completed report
        now = time.monotonic()
        if fraction <= self.last_fraction or now - self.last_at < PROGRESS_EVERY_SECONDS:
            return
        self.last_at, self.last_fraction = now, fraction
        update: dict[str, Any] = {"state": "running", "progress": fraction}
        message = ": ".join(str(part) for part in (self.note, phase) if part)
        if message:
            update["message"] = message
        self.last_message = message or None
        self.spool.put_status(self.job_id, update)

    def resume(self) -> None:
        """Put back what the seat said before a wait said why it waited."""
        self.spool.put_status(self.job_id, {"state": "running", "progress": max(0.0, self.last_fraction),
                                            **({"message": self.last_message} if self.last_message else {})})

    def say(self, text: str) -> None:
        """Put why the seat waits on it, at the progress it reached."""
        self.spool.put_status(self.job_id, {"state": "running", "progress": max(0.0, self.last_fraction),
                                            "message": _phase(self.note, text)})


def _raw(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _unexpected_failure(job_id: str, exc: Exception) -> str:
    """The job's error for a failure no step foresaw. Every project member reads it and an unforeseen message may
    quote a path or a value, so the details stay in this worker's log; a disk that refused a write is said."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        log.error("job %s: the spool refused a write: %s", job_id, exc.strerror)
        return ("the worker's spool volume refused a write (full or read-only); its operator frees space on "
                "CAPE_SPOOL_DIR's volume, then the job is submitted again")
    if limit := shortage(exc):  # the container's limits: its operator acts, nothing is wrong with the job
        what, remedy = limit
        log.error("job %s: the runner %s (%s: %s); its operator %s", job_id, what, type(exc).__name__, exc, remedy)
        return f"the worker's runner {what}; its operator {remedy}, then the job is submitted again"
    log.exception("job %s: unexpected failure", job_id, exc_info=exc)
    return (f"the worker's runner failed unexpectedly ({type(exc).__name__}); the details are in that worker's "
            "runner log")


def main() -> int:
    """Entry point of the supervisord program `runner`."""
    from services.worker import program

    def run_jobs(config: WorkerConfig) -> None:
        import boto3

        keys = program.load_keys(config)
        stop = threading.Event()
        spool = Spool(config.spool_dir)
        if removed := spool.remove_scratch(SCRATCH_PREFIX):  # a dataview download cut off by a kill: our data
            log.info("removed %d partial dataview download(s) left by an earlier runner", removed)
        runner = Runner(spool, keys, stop, s3_client=lambda: boto3.client("s3", config=s3_client_config(),
                                                                           **config.boto3_kwargs("s3")),
                        model_bucket=lambda spec: model_bucket(config, spec.task.get("model_location")),
                        run_dir=config.run_dir)
        log.info("running jobs from %s", config.spool_dir)
        with spool.watching("jobs", "inbox"):
            runner.run()  # however it ends (SIGTERM too), it stops the job threads and waits for them

    return program.run("runner", run_jobs)


if __name__ == "__main__":
    from services.process_exit import run_then_exit

    run_then_exit(main)  # the runner reads dataviews with Arrow: see services/process_exit.py
