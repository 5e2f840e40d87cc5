"""The poller program: the worker's only conversation with the coordinator.

Logs in with CAPE_TOKEN, registers the worker's public keys, heartbeats (with the four programs' supervisord
states, at least every HEARTBEAT_SECONDS and whenever they change), copies approved jobs where this
organization holds a seat into the spool, sends the spool's status updates (in order, each removed only after the
coordinator accepted it) and marks jobs the coordinator ended (Stopped, Error, Completed, Rejected) so the runner
drops them.
An unreachable coordinator is retried with capped exponential backoff and logged, never a crash loop.

Run as `python -m services.worker.poller`.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from services.worker import health, program
from services.worker.config import RETRY_BASE_SECONDS, WorkerConfig
from services.worker.coordinator_client import (CoordinatorAuthError, CoordinatorClient, CoordinatorError,
                                                CoordinatorMisaddressed, CoordinatorUnreachable, CoordinatorUntrusted,
                                                JobEnded, KeysNotRegistered, RequestRefused, SeatTaken)
from services.worker.keys import WorkerKeys
from services.worker.disk_advice import disk_advice
from services.worker.outage_log import UNHEALTHY_AFTER_SECONDS, OutageLog, without_numbers
from services.worker.partner_keys import PartnerKeyBook
from services.worker.spool import FINISHED_JOBS_KEPT, InvalidName, Spool

ENDED_STATUSES = ("Stopped", "Error", "Completed", "Rejected")
# Ends the job watcher marks at once. Not Completed: each seat finishes its own role and reports it, and a seat
# whose job is marked ended drops its reports still queued; the cycle marks Completed jobs a poll interval later.
INTERRUPTING_STATUSES = ("Stopped", "Error")
FINAL_SEAT_STATES = ("completed", "error")
HEARTBEAT_SECONDS = 15.0
OLDER_COORDINATOR_RECHECK_SECONDS = 3600.0  # how long heartbeats go without the key check an older server refused
PRUNE_SECONDS = 60.0  # how often old finished jobs are looked for (a scan of the spool's jobs/ folder)
MAX_BACKOFF_SECONDS = 30.0
# Status files from the runner and uploader are local: they are reported this soon after they appear, while
# the coordinator itself is polled for jobs every CAPE_POLL_INTERVAL.
STOPPING_SAID_WITHIN_SECONDS = 2.0  # inside supervisord's stopwaitsecs for the poller (7)
WATCH_BACKOFF_CAP_SECONDS = 4.0  # the job watch's longest pause after a failure (the cycle covers longer outages)
SPOOL_WATCH_SECONDS = 0.02  # without a spool watch, how soon a status file the runner wrote is reported
JOB_WATCH_SECONDS = 25.0  # one long poll of the job list; below the coordinator's 60 s limit and proxies' timeouts
VERSION = "0.1.0"

log = logging.getLogger("cape.poller")


def refusal_reason(exc: Exception) -> str:
    """A refusal's cause for `OutageLog`, without the numbers in it: the coordinator's refusal of a second worker
    says how many seconds ago the first was heard from, which changed at every retry, so each retry was taken for a
    new reason and said at ERROR (one line per retry for as long as two workers shared a token)."""
    return without_numbers(str(exc))


@dataclass
class Backoff:
    """Capped exponential backoff with jitter: up to `base`, 2*base, ... `cap` seconds, each at least half of it;
    `reset()` after a success. Without jitter, every worker of a restarted coordinator retried at the same 1, 2,
    4, 8 s and came back in waves (a tenth of them 8 s after it answered)."""

    base: float
    cap: float = MAX_BACKOFF_SECONDS
    failures: int = field(default=0)

    def next_delay(self) -> float:
        self.failures += 1
        return random.uniform(0.5, 1.0) * min(self.cap, self.base * 2 ** (self.failures - 1))

    def reset(self) -> None:
        self.failures = 0


class Poller:
    """One cycle at a time (`cycle()`), so tests can drive it without the endless loop of `run()`."""

    def __init__(self, config: WorkerConfig, client: CoordinatorClient, spool: Spool, keys: WorkerKeys,
                 program_states: Callable[[], dict[str, str]] | None = None) -> None:
        self.config = config
        self.client = client
        self.spool = spool
        self.keys = keys
        self.partner_keys = PartnerKeyBook(config.state_dir)
        self.program_states = program_states or (lambda: {})
        self.registered = False
        # Set while the coordinator holds this worker's keys for the organization: only then are jobs stored. A
        # second worker refused the seat must not take the jobs (its messenger would drop the messages sealed for
        # the running worker, as any it cannot open).
        self.seat_held = threading.Event()
        self.last_heartbeat = 0.0
        self.older_coordinator = False  # it refused the heartbeat's key check: heartbeats go without it
        self.older_since = 0.0  # when it last refused it (monotonic; 0: never)
        self.last_prune = 0.0
        self.last_programs: dict[str, str] | None = None
        self._store_lock = threading.Lock()  # the cycle and the job watcher both store jobs
        self._ended_lock = threading.Lock()  # ... and both mark ended ones

    def start(self) -> None:
        """Log in and register keys (once per process start)."""
        identity = self.client.login()
        organization = (identity.get("organization") or {}).get("label", "?")
        if identity.get("kind") != "organization":
            raise CoordinatorAuthError("CAPE_TOKEN is a user token; a worker needs an organization token "
                                       "(`cape orgs create-token ORG`)")
        self.client.register_keys(self.keys.encryption_public_b64, self.keys.signing_public_b64)
        self.registered = True
        self.seat_held.set()
        log.info("logged in as organization %s (token id %s); public keys registered", organization,
                 self.config.token_id)

    def cycle(self) -> None:
        """Heartbeat when due, fetch jobs, notice ended jobs, send status updates, forget old finished jobs."""
        if not self.registered:
            self.start()
        self.heartbeat()
        served = self.fetch_jobs()
        self.notice_ended(served)
        self.send_status()
        if time.monotonic() - self.last_prune >= PRUNE_SECONDS:
            self.last_prune = time.monotonic()
            for job_id in self.spool.prune_finished():
                log.info("job %s: its record left the spool, beyond the %d most recently finished jobs it keeps (the "
                         "coordinator keeps every job)", job_id, FINISHED_JOBS_KEPT)
            self.spool.sweep_temp()  # torn temporaries of writers killed over an hour ago, whichever program

    def heartbeat(self) -> None:
        """Tell the coordinator this worker is alive, with its programs' states, when due or when they changed."""
        now = time.monotonic()
        programs = self.program_states()
        if now - self.last_heartbeat >= HEARTBEAT_SECONDS or programs != self.last_programs:
            try:
                self._heartbeat(programs)
            except KeysNotRegistered:
                # Registered once per start: without this, every job failed for want of keys while the worker
                # looked healthy, until it was restarted.
                log.warning("the coordinator holds no keys for this worker (its data restored from a backup older "
                            "than this worker's start?); registering them again")
                self.registered = False
                self.start()
                self._heartbeat(programs)
            self.last_heartbeat, self.last_programs = now, programs

    def _heartbeat(self, programs: dict[str, str]) -> None:
        """One heartbeat, with this worker's key for the coordinator to check; without it to a coordinator older
        than the key check, which refuses the field (422): every heartbeat failed, and with it the cycle's status
        reports, so jobs ended in Error or stayed Started while the worker computed them."""
        if self.older_coordinator and time.monotonic() - self.older_since >= OLDER_COORDINATOR_RECHECK_SECONDS:
            self.older_coordinator = False  # it may have been upgraded meanwhile: the key check comes back
        if not self.older_coordinator:
            try:
                self.client.heartbeat(version=VERSION, programs=programs or None,
                                      signing_public_key=self.keys.signing_public_b64)
                return
            except RequestRefused as exc:
                said = self.older_since > 0
                self.older_coordinator, self.older_since = True, time.monotonic()
                if said:
                    log.debug("the coordinator still refuses the heartbeat's key check: %s", exc)
                else:
                        log.warning("the coordinator is older than this worker (it refused the heartbeat's key check: "
                                "%s); heartbeats go without it (tried again every hour), and the coordinator does "
                                "not notice a second worker of this organization; upgrade cape-server (a server "
                                "first, then its workers)", exc)
        self.client.heartbeat(version=VERSION, programs=programs or None)

    def say_stopping(self) -> None:
        """Tell the coordinator this worker stops (best effort, within `STOPPING_SAID_WITHIN_SECONDS`), so its
        partners' users see it offline at once rather than 45 s later."""
        if not self.registered:
            return
        try:
            self.client.heartbeat(version=VERSION, signing_public_key=self.keys.signing_public_b64, stopping=True,
                                  timeout=STOPPING_SAID_WITHIN_SECONDS)
        except CoordinatorError:
            return  # unreachable or refused: it shows offline after 45 s, as before
        log.info("told the coordinator this worker is stopping")

    def fetch_jobs(self) -> set[str]:
        """Store every approved/started job of ours in the spool; returns the ids served."""
        specs = self.client.jobs()
        served = self.store_jobs(specs)
        self.report_again_if_lost(specs)
        return served

    def report_again_if_lost(self, specs: list[dict[str, Any]]) -> None:
        """Queue again the final report of a served job whose seat the coordinator shows unfinished: its data was
        restored from a backup taken before the report, and the job would stay Started for ever (nobody reports a
        finished role twice)."""
        for spec in specs:
            job_id, state = spec.get("id"), spec.get("seat_state")
            if state is None or state in FINAL_SEAT_STATES or not isinstance(job_id, str):
                continue  # an older coordinator (no seat_state), or nothing lost
            try:
                reported = self.spool.reported(job_id)
                if reported is None or self.spool.has_pending_status(job_id):
                    continue
                self.spool.put_status(job_id, reported, source="poller")
            except InvalidName:
                continue
            log.warning("job %s: the coordinator shows this seat %s although it reported %s (its data restored from "
                        "an older backup?); reporting it again", job_id, state, reported.get("state"))

    def store_jobs(self, specs: list[dict[str, Any]]) -> set[str]:
        """Store the listed jobs in the spool; returns their ids. A job naming other keys than this worker's for
        its seat is not stored: another worker of the organization took the seat (while this one was cut off, say),
        and running it here would end it in Error; this worker registers again (refused while the other is alive)."""
        served = set()
        with self._store_lock:
            for spec in specs:
                try:
                    if not self._names_our_keys(spec):
                        log.error("job %s names other keys for seat %s: another worker of this organization holds "
                                  "its seat; no job is taken here until this worker holds it again", spec["id"],
                                  spec.get("seat"))
                        self.seat_held.clear()
                        self.registered = False
                    else:
                        changed, previous = self.spool.store_job(spec)
                        if previous is None or previous.get("parties") != spec.get("parties"):
                            self._note_partner_keys(spec)
                        if changed:
                            # Said when the job is new or its status moved: its seat's state changes the view too,
                            # and one line per such change read like the job being taken again.
                            stored = previous is None or previous.get("status") != spec.get("status")
                            log.log(logging.INFO if stored else logging.DEBUG, "job %s (%s) stored for seat %s",
                                    spec["id"], spec.get("status"), spec.get("seat"))
                    served.add(spec["id"])
                except (InvalidName, KeyError, TypeError, AttributeError):
                    log.error("ignoring a job from the coordinator with an invalid id or shape")
        return served

    def _note_partner_keys(self, spec: dict[str, Any]) -> None:
        """Say it when a partner organization's worker shows other keys than before (partner_keys.py)."""
        try:
            changes = self.partner_keys.note(spec)
        except OSError as exc:
            log.warning("job %s: cannot record the partners' key fingerprints in %s (%s); a change of their keys "
                        "goes unnoticed until it can", spec["id"], self.partner_keys.path, exc.strerror or exc)
            return
        for change in changes:
            log.warning("%s", change.line())

    def _names_our_keys(self, spec: dict[str, Any]) -> bool:
        party = (spec.get("parties") or {}).get(spec.get("seat")) or {}
        return party.get("signing_public_key") in (None, self.keys.signing_public_b64)

    def watch_jobs(self, client: CoordinatorClient, stop: threading.Event, wait: float = JOB_WATCH_SECONDS) -> None:
        """Until `stop`, long-poll the job list: store jobs the moment they are approved, and mark those that left
        it (stopped, Error) ended at once.

        `client` is this thread's own (HTTP sessions are not shared between threads). Failures only pause the
        watch: the cycle reports coordinator problems and still fetches the list every CAPE_POLL_INTERVAL.
        """
        version: int | None = None
        backoff, refused = Backoff(1.0, cap=WATCH_BACKOFF_CAP_SECONDS), Backoff(1.0)
        while not stop.is_set():
            if not self.seat_held.wait(timeout=1.0):
                continue  # not registered yet, or another worker holds the seat: the cycle says so
            try:
                specs, version = client.wait_for_jobs(version, wait)
            except CoordinatorError as exc:
                version = None
                # An outage (or an untrusted certificate, which the operator fixes) is looked at again within a
                # few seconds; a refusal (a revoked token) only as often as before the cap, up to 30 s: asking
                # again soon changes nothing, and the cycle reports both.
                outage = isinstance(exc, CoordinatorUnreachable) and not isinstance(exc, CoordinatorUntrusted)
                stop.wait((backoff if outage else refused).next_delay())
                continue
            refused.reset()
            backoff.reset()
            try:
                served = self.store_jobs(specs)
            except OSError as exc:
                if exc.filename is None:
                    raise
                stop.wait(backoff.next_delay())  # the spool refused the write: the cycle logs it, and retries
                continue
            if version is None:  # a coordinator without long polls: the cycle's fetches are enough
                return
            try:  # a job stopped or ended in Error leaves the list: its seat stops now, not at the next cycle
                self.notice_ended(served, client, INTERRUPTING_STATUSES)
            except CoordinatorError:
                pass  # the cycle reports coordinator problems, and looks again
            except OSError as exc:  # a job's end the spool could not record: raised, it ended this thread for good
                if exc.filename is None:
                    raise
                stop.wait(backoff.next_delay())  # the cycle logs it, and retries

    def notice_ended(self, served: set[str], client: CoordinatorClient | None = None,
                     statuses: tuple[str, ...] = ENDED_STATUSES) -> None:
        """For spooled jobs the coordinator no longer serves, look up their status and mark those ended in one of
        `statuses`. Both the cycle and the job watcher call it, each with its own client."""
        client = client or self.client
        with self._ended_lock:  # one lookup and one log line per job, whichever thread comes first
            for job_id in self.spool.unended_job_ids():
                if job_id in served:
                    continue
                try:
                    job = client.job(job_id)
                except CoordinatorUnreachable:
                    raise
                except CoordinatorError as exc:
                    log.warning("job %s is no longer visible to this worker (%s); dropping it", job_id, exc)
                    self.spool.mark_ended(job_id, "Error", str(exc))
                    continue
                status = job.get("status")
                if status in statuses:
                    # The job's error says which seat failed and why: without it a partner's log showed only
                    # "Error" and its operator had to ask the coordinator (`cape jobs status`) what happened.
                    reason = job.get("error")
                    self.spool.mark_ended(job_id, status, reason)
                    log.info("job %s ended at the coordinator: %s%s", job_id, status, f" ({reason})" if reason else "")

    def send_status(self) -> None:
        """Report queued status updates in order; stop at the first one the coordinator could not take now."""
        for item in self.spool.pending_status():
            update = item.read()
            ended = self.spool.ended(item.job_id)
            # The coordinator would refuse it (409): nothing left to tell. Except this seat's own "completed" for a
            # job the output seat completed meanwhile (an outage, say): taken, so the seat does not show pending;
            # and its own "error" for a job in Error: a partner's report that this seat stopped the job ("... see
            # its error") may have come first, and this seat's error then becomes the job's.
            if ended is not None and (ended.get("status"), update.get("state")) not in (("Completed", "completed"),
                                                                                        ("Error", "error")):
                self.spool.ack_status(item)
                continue
            try:
                self.client.report(item.job_id, update)
            except JobEnded as exc:
                self.spool.mark_ended(item.job_id, exc.status, str(exc))
                log.info("job %s is %s at the coordinator; the worker stops it", item.job_id, exc.status)
            except CoordinatorUnreachable:
                raise
            except CoordinatorError as exc:
                log.error("the coordinator refused a %s report for job %s: %s", update.get("state"), item.job_id,
                          exc)
            else:
                log.info("reported job %s: %s %.0f%%", item.job_id, update.get("state"),
                         100 * float(update.get("progress") or 0))
                if update.get("state") in FINAL_SEAT_STATES:
                    self.spool.note_reported(item.job_id, update)
            self.spool.ack_status(item)

    def run(self, max_cycles: int | None = None) -> None:
        """Cycle every `poll_interval` seconds, backing off while the coordinator is unreachable."""
        backoff = Backoff(min(self.config.poll_interval, RETRY_BASE_SECONDS))
        outage = OutageLog(log)  # since the last cycle that reached the coordinator
        # Refusals that need the operator (a token, a certificate, a URL): said at once and when the reason changes,
        # else once a minute; one ERROR per retry was 360 identical lines an hour for a revoked token.
        refused = OutageLog(log, level=logging.ERROR)
        unwritable = OutageLog(log, level=logging.ERROR)  # the spool's refusals, likewise
        said_unhealthy = False
        cycles = 0
        while max_cycles is None or cycles < max_cycles:
            cycles += 1
            self._look_at_spool_refusal()  # whether or not the coordinator answers
            try:
                self.cycle()
            except (CoordinatorAuthError, SeatTaken) as exc:
                # Both need the operator while every program still runs: the health check says so.
                delay = max(backoff.next_delay(), 10.0)
                refused.failed(f"{exc}; retrying in {delay:.0f} s", reason=refusal_reason(exc))
                health.LOGIN_REFUSED.note(self.config.run_dir, str(exc), log)
                health.COORDINATOR_UNREACHABLE.clear(self.config.run_dir)  # it answered
                if isinstance(exc, SeatTaken):
                    self.seat_held.clear()
                    self.registered = False  # register again next time: the other worker may have stopped
            except CoordinatorUntrusted as exc:
                delay = max(backoff.next_delay(), 10.0)  # a certificate or CA file needs the operator, not retries
                refused.failed(f"{exc}; retrying in {delay:.0f} s", reason=refusal_reason(exc))
                health.COORDINATOR_UNTRUSTED.note(self.config.run_dir, str(exc), log)
            except CoordinatorUnreachable as exc:
                delay = backoff.next_delay()
                outage.failed(f"{exc}; retrying in {delay:.1f} s")
                health.COORDINATOR_UNREACHABLE.note(self.config.run_dir, str(exc), log)
                if outage.lasting >= UNHEALTHY_AFTER_SECONDS and not said_unhealthy:
                    said_unhealthy = True
                    log.error("the coordinator at %s has been unreachable for over %.0f min: `cape-worker health` now "
                              "fails; if it moved, set CAPE_COORDINATOR to its new URL", self.config.coordinator,
                              UNHEALTHY_AFTER_SECONDS / 60)
            except CoordinatorMisaddressed as exc:
                delay = max(backoff.next_delay(), 10.0)  # a URL to fix: the operator, not retries
                refused.failed(f"{exc}; retrying in {delay:.0f} s", reason=refusal_reason(exc))
                health.COORDINATOR_MISADDRESSED.note(self.config.run_dir, str(exc), log)
            except CoordinatorError as exc:
                delay = backoff.next_delay()
                log.error("%s; retrying in %.1f s", exc, delay)
            except OSError as exc:
                if exc.filename is None:  # not the spool's: a bug, for supervisord's restart and its traceback
                    raise
                delay = backoff.next_delay()
                unwritable.failed(f"cannot write the spool ({exc.filename}: {exc.strerror}); "
                                  f"{disk_advice(exc, 'CAPE_SPOOL_DIR')}; retrying in {delay:.1f} s",
                                  reason=exc.strerror)
                health.SPOOL_REFUSES_WRITES.note(self.config.run_dir, f"cannot write {exc.filename} ({exc.strerror}); "
                                                 f"{disk_advice(exc, 'CAPE_SPOOL_DIR')}", log)
            else:
                lasted = outage.recovered()  # None after a refusal: the coordinator answered all along
                refused.recovered()
                unwritable.recovered()
                if lasted is not None:
                    log.info("the coordinator at %s is reachable again (%s)", self.config.coordinator, lasted)
                said_unhealthy = False
                backoff.reset()
                if health.LOGIN_REFUSED.clear(self.config.run_dir):
                    log.info("the coordinator accepts this worker again")
                health.COORDINATOR_UNTRUSTED.clear(self.config.run_dir)
                health.COORDINATOR_MISADDRESSED.clear(self.config.run_dir)
                health.COORDINATOR_UNREACHABLE.clear(self.config.run_dir)
                self.report_until(time.monotonic() + self.config.poll_interval)
                continue
            time.sleep(delay)

    def _look_at_spool_refusal(self) -> None:
        """After a program recorded the spool refusing its writes: clear the record once a write goes through (a
        refusal since is recorded again by whoever meets it)."""
        if health.SPOOL_REFUSES_WRITES.read(self.config.run_dir) is None or self.spool.write_refused() is not None:
            return
        if health.SPOOL_REFUSES_WRITES.clear(self.config.run_dir):
            log.info("the spool takes writes again")

    def report_until(self, deadline: float) -> None:
        """Until `deadline`, send status files as soon as they appear; return early if the coordinator fails
        (the next cycle backs off)."""
        while (left := deadline - time.monotonic()) > 0:
            # A CAPE_POLL_INTERVAL longer than HEARTBEAT_SECONDS must not make the worker look offline.
            beat_in = self.last_heartbeat + HEARTBEAT_SECONDS - time.monotonic()
            seen = self.spool.changes.generation
            if beat_in > 0 and not self.spool.pending_status():
                # A new status file wakes it.
                self.spool.changes.wait(seen, SPOOL_WATCH_SECONDS, at_most=min(left, beat_in))
                continue
            try:
                if beat_in <= 0:
                    self.heartbeat()
                self.send_status()
            except CoordinatorError:
                return


def supervised_program_states() -> dict[str, str]:
    """The four programs' states from supervisord ({} when not run under `cape-worker run`)."""
    try:
        return health.program_states(health.run_dir_from_env(os.environ))
    except health.SupervisorUnavailable:
        return {}


def main() -> int:
    """Entry point of the supervisord program `poller`."""
    return program.run("poller", _poll)


def _poll(config: WorkerConfig) -> None:
    keys = program.load_keys(config)
    client = CoordinatorClient(config.coordinator, config.token)
    watch_client = CoordinatorClient(config.coordinator, config.token)
    stop = threading.Event()
    spool = Spool(config.spool_dir)
    poller = Poller(config, client, spool, keys, supervised_program_states)
    watcher = threading.Thread(target=poller.watch_jobs, args=(watch_client, stop), name="job-watch", daemon=True)
    log.info("polling %s every %.1f s, and watching it for approved jobs", config.coordinator, config.poll_interval)
    with spool.watching("status"):
        watcher.start()
        try:
            poller.run()
        finally:
            stop.set()
            poller.say_stopping()
            client.close()
            watch_client.close()


if __name__ == "__main__":
    from services.process_exit import run_then_exit

    run_then_exit(main)  # a stop does not wait for threads blocked on the network: see services/process_exit.py
