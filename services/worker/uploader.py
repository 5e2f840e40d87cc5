"""The uploader program: result files from the spool to the model owner's bucket, then a "completed" status.

Layout (pycape's, read back by `Job.get_results()` with `np.loadtxt(..., delimiter=",")`):

    <bucket>[/<prefix>]/<job_id>/regression_weights.csv   intercept first, one number per line
    <bucket>[/<prefix>]/<job_id>/metrics.json             {"mse_result": ..., "r_squared_result": ...}

CAPE_BUCKET (s3://bucket[/prefix] or file:///dir) overrides the job's model_location. S3 uploads go through boto3's
managed transfer (multipart above `MULTIPART_THRESHOLD`); AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) points it at an
S3-compatible store. The metrics go first and the weights last: a weights file is a whole model.

A finished computation is not thrown away for what its operator can fix: a store that is away or busy is tried
again until it takes the model, and a refusal (no bucket, access denied, credentials refused or expired, no
location) is tried again every `REFUSED_RETRY_SECONDS` for `REFUSED_KEPT_SECONDS` after the result came, the job
staying Started with the reason on the model owner's seat, before the job ends in Error.

Run as `python -m services.worker.uploader`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.worker import program
from services.worker.config import RETRY_BASE_SECONDS, Bucket, ConfigError, WorkerConfig, parse_bucket
from services.worker.disk_advice import disk_advice
from services.worker.outage_log import OutageLog
from services.worker.s3_errors import code_and_status, is_transient
from services.worker.spool import Spool, atomic_write_bytes, leftover_temps

WEIGHTS_FILE = "regression_weights.csv"
METRICS_FILE = "metrics.json"
MULTIPART_THRESHOLD = 8 * 1024 * 1024
MAX_BACKOFF_SECONDS = 30.0
REFUSED_RETRY_SECONDS = 60.0  # a refused model is tried again this often (a restarted uploader tries at once)
REFUSED_KEPT_SECONDS = 24 * 3600.0  # and for this long after its result came, before the job ends in Error
# Each S3 request: the objects are a few KB, so a store that does not answer in this long is said on the seat soon
# (3 tries of 60 s kept a hanging store silent for 3 minutes per job).
UPLOAD_READ_TIMEOUT_SECONDS = 15.0
UPLOAD_ATTEMPTS = 2
SPOOL_WATCH_SECONDS = 0.02  # without a spool watch, how soon a result the runner wrote is uploaded (one listing)

log = logging.getLogger("cape.uploader")
_BUCKET_DIRECTORY = "the directory of CAPE_BUCKET (or the job's model_location)"
UPLOAD_SCRATCH_PREFIX = ".upload-"  # the uploader's scratch files under the spool's tmp/


class UploadError(RuntimeError):
    """Storing a result failed in a way retrying will not fix; the message says what to change.

    `public` is what the job's error says: every project member reads it, and where the model owner keeps its
    models (its bucket, a path on its machine) is for the model owner's eyes, so it names no location; the
    worker's own log has the whole message."""

    def __init__(self, message: str, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public or message


class UploadUnavailable(UploadError):
    """The store could not be reached right now: retry later."""

    def __init__(self, message: str, public: str | None = None, bucket: str = "") -> None:
        super().__init__(message, public)
        self.bucket = bucket  # the store that is away: the other results for it wait without trying


def weights_csv(weights: list[float] | np.ndarray) -> bytes:
    """The weights file's bytes: one number per line, intercept first, read by `np.loadtxt(..., delimiter=",")`.
    Each is the shortest text that reads back as the same double, as `cape jobs results` prints it (`%.17g` wrote
    0.10000000000000001 where the CLI says 0.1)."""
    return "".join(f"{float(w)!r}\n" for w in np.asarray(weights, dtype=np.float64).reshape(-1)).encode()


def object_key(bucket: Bucket, job_id: str, filename: str) -> str:
    """`[prefix/]JOB_ID/filename`."""
    return "/".join(part for part in (bucket.prefix, job_id, filename) if part)


def object_uri(bucket: Bucket, key: str) -> str:
    """The URI of `key` in `bucket` (s3://bucket/key or file:///dir/key)."""
    if bucket.scheme == "file":
        return (Path(bucket.name) / key).as_uri()
    return f"s3://{bucket.name}/{key}"


class ModelStore:
    """Writes objects to an s3:// bucket (boto3 managed transfer) or a file:// directory."""

    def __init__(self, config: WorkerConfig, read_timeout: float = UPLOAD_READ_TIMEOUT_SECONDS,
                 attempts: int = UPLOAD_ATTEMPTS) -> None:
        """`read_timeout` and `attempts` bound each S3 request (a check wants an answer in seconds, an upload can
        wait)."""
        self.config = config
        self.read_timeout = read_timeout
        self.attempts = attempts
        self._s3 = None

    @property
    def s3(self):
        if self._s3 is None:
            import boto3
            from botocore.config import Config

            self._s3 = boto3.client("s3", config=Config(connect_timeout=5, read_timeout=self.read_timeout,
                                                        retries={"total_max_attempts": self.attempts,
                                                                 "mode": "standard"}),
                                    **self.config.boto3_kwargs("s3"))
        return self._s3

    def put_bytes(self, bucket: Bucket, key: str, data: bytes, scratch_dir: Path) -> str:
        """Store `data` at `key`; returns the object's URI."""
        if bucket.scheme == "file":
            return self._put_file_bytes(bucket, key, data)
        scratch = scratch_dir / f"{UPLOAD_SCRATCH_PREFIX}{os.getpid()}-{time.time_ns()}.tmp"
        scratch.parent.mkdir(parents=True, exist_ok=True)
        try:
            scratch.write_bytes(data)
            return self.upload_file(bucket, key, scratch)
        finally:
            scratch.unlink(missing_ok=True)

    def upload_file(self, bucket: Bucket, key: str, path: Path) -> str:
        """Store the file at `path` under `key` (multipart for large files on S3); returns the object's URI."""
        if bucket.scheme == "file":
            return self._put_file_bytes(bucket, key, path.read_bytes())
        from boto3.exceptions import S3UploadFailedError
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        uri = object_uri(bucket, key)
        transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
        try:
            # Making the client is inside: it resolves credentials and region (a missing AWS_PROFILE, say).
            self.s3.upload_file(str(path), bucket.name, key, Config=transfer)
        except NoCredentialsError:
            raise UploadError(f"no AWS credentials to write {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                              "(or give the host an instance role)",
                              "the model owner's worker has no AWS credentials") from None
        except (S3UploadFailedError, ClientError) as exc:
            raise _upload_error(uri, bucket.uri, exc, self.config.endpoint_variable("s3")) from None
        except EndpointConnectionError:
            raise UploadUnavailable(f"cannot reach S3 to write {uri}; check {self.config.endpoint_variable('s3')}, "
                                    "AWS_REGION and the network",
                                    "the model owner's worker cannot reach its bucket's store", bucket.uri) from None
        except BotoCoreError as exc:
            # botocore's text names what is wrong (a profile, a credentials endpoint), never a secret's value.
            raise UploadUnavailable(f"S3 failed while writing {uri}: {type(exc).__name__}: {exc}; check "
                                    f"{self.config.endpoint_variable('s3')}, AWS_REGION and the AWS credentials' "
                                    "settings",
                                    f"the model owner's worker cannot reach its bucket ({type(exc).__name__})",
                                    bucket.uri) from None
        return uri

    def delete(self, bucket: Bucket, key: str) -> None:
        """Remove `key` (used by `cape-worker check` to clean its test object)."""
        if bucket.scheme == "file":
            (Path(bucket.name) / key).unlink(missing_ok=True)
        else:
            self.s3.delete_object(Bucket=bucket.name, Key=key)

    def _put_file_bytes(self, bucket: Bucket, key: str, data: bytes) -> str:
        target = Path(bucket.name) / key
        try:
            atomic_write_bytes(target, data)
            for leftover in leftover_temps(target):  # an upload killed mid-write: in the model owner's own folder
                leftover.unlink(missing_ok=True)
        except OSError as exc:
            raise UploadError(f"cannot write {target}: {exc.strerror}; "
                              f"{disk_advice(exc, _BUCKET_DIRECTORY)}",
                              f"the model owner's worker cannot write to its bucket ({exc.strerror})") from None
        return target.as_uri()


def _upload_error(uri: str, bucket: str, exc: Exception, endpoint_variable: str) -> UploadError:
    code, status = code_and_status(exc)
    public = f"the model owner's bucket refused the model ({code or type(exc).__name__})"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return UploadError(f"AWS does not accept this worker's credentials writing {uri} ({code}): check "
                           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", public)
    if code in ("ExpiredToken", "TokenRefreshRequired", "RequestExpired"):
        return UploadError(f"this worker's temporary AWS credentials have expired writing {uri} ({code}): give it "
                           "new ones (AWS_SESSION_TOKEN with its keys) and restart it, or use an instance role or "
                           "a profile, which renew themselves", public)
    if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
        return UploadError(f"access denied writing {uri} ({code}): give this worker's AWS credentials "
                           "s3:PutObject on the bucket, or set CAPE_BUCKET to a bucket they can write", public)
    if code in ("NoSuchBucket", "404"):
        return UploadError(f"the bucket of {uri} does not exist: create it, or fix CAPE_BUCKET / the job's "
                           "model_location", f"the model owner's bucket does not exist ({code})")
    if is_transient(code, status):
        # A proxy or a load balancer answering 502, a store starting up: the finished job's model must not be
        # thrown away for what passes.
        return UploadUnavailable(f"S3 is busy or unavailable writing {uri} ({code or status})",
                                 f"the model owner's bucket is busy or unavailable ({code or status})", bucket)
    return UploadError(f"S3 refused to store {uri} ({code or type(exc).__name__}); if {endpoint_variable} is set, "
                       "check it is an S3-compatible store", public)


def model_bucket(config: WorkerConfig, location: str | None) -> Bucket:
    """Where the model owner's worker writes a job's model: CAPE_BUCKET if set, else the job's `location`; an
    `UploadError` if neither is usable (the runner asks before the job's data is loaded, the uploader at upload)."""
    if config.bucket is not None:
        return config.bucket
    if not location:
        raise UploadError("the job has no model_location and CAPE_BUCKET is not set: set CAPE_BUCKET to "
                          "s3://bucket[/prefix] or file:///dir on the model owner's worker",
                          "the job names no model location and the model owner's worker has no CAPE_BUCKET")
    try:
        bucket = parse_bucket(location, "the job's model_location")
    except ConfigError as exc:
        raise UploadError(f"{exc}; or set CAPE_BUCKET to override it",
                          "the job's model location is not one a worker writes to") from None
    if bucket.scheme == "file":
        # The submitter chose this location, and the model owner never approved it: a path on this machine is
        # written only where the worker's own operator said (CAPE_BUCKET).
        raise UploadError(f"the job's model_location {location} is a path on this worker's machine, which only "
                          "CAPE_BUCKET may name: set CAPE_BUCKET=file:///dir (or s3://bucket) on the model "
                          "owner's worker",
                          "the job's model location is a path, which only the model owner's CAPE_BUCKET may name")
    return bucket


class Uploader:
    """Moves each pending result of the spool to its bucket and queues the "completed" status."""

    def __init__(self, config: WorkerConfig, spool: Spool, store: ModelStore | None = None) -> None:
        self.config = config
        self.spool = spool
        self.store = store or ModelStore(config)
        self._waiting_said: dict[str, str] = {}  # job -> the reason its seat shows for waiting to upload
        self._refused_until: dict[str, float] = {}  # job -> when (time.monotonic()) its refused model is tried again
        self._outage = OutageLog(log)
        self._spool_said: set[str] = set()  # jobs whose result the spool's volume held up, said once each

    def bucket_for(self, result: dict[str, Any], job_id: str) -> Bucket:
        """CAPE_BUCKET if set, else the job's model_location; an error if neither is usable."""
        location = result.get("model_location")
        if not location:
            spec = self.spool.read_job(job_id) or {}
            location = (spec.get("task") or {}).get("model_location")
        return model_bucket(self.config, location)

    def upload(self, job_id: str) -> str | None:
        """Store one job's metrics, then its weights; queue its completed status; return the weights URI (None for
        a job that ended at the coordinator before its weights were written, whose model is not published)."""
        result = self.spool.read_result(job_id)
        if result is None:
            raise UploadError(f"no result for job {job_id} in the spool")
        if self._called_off(job_id, "before its model was uploaded; the model is not published"):
            return None
        bucket = self.bucket_for(result, job_id)
        metrics = {k: float(v) for k, v in (result.get("metrics") or {}).items()}
        scratch = self.spool.root / "tmp"
        metrics_uri = self.store.put_bytes(bucket, object_key(bucket, job_id, METRICS_FILE),
                                           json.dumps(metrics, sort_keys=True).encode() + b"\n", scratch)
        # A stop that came while the metrics were written (a slow store) still keeps the model unpublished.
        if self._called_off(job_id, f"while its model was uploaded; its weights are not written ({metrics_uri} "
                                    "was, and stays: this worker may not delete)"):
            return None
        weights_uri = self.store.put_bytes(bucket, object_key(bucket, job_id, WEIGHTS_FILE),
                                           weights_csv(result["weights"]), scratch)
        # Status before ack: a crash in between re-uploads the same bytes and repeats an idempotent report.
        self.spool.put_status(job_id, {"state": "completed", "progress": 1.0, "metrics": metrics,
                                       "model_location": weights_uri}, source="uploader")
        self.spool.ack_result(job_id)
        log.info("job %s: weights and metrics stored at %s", job_id, weights_uri)
        return weights_uri

    def _called_off(self, job_id: str, what: str) -> bool:
        """Whether the job was stopped (or ended in Error) at the coordinator: publishing its model would go against
        the decision that stopped it; the result is dropped, saying `what` became of it. (Completed: this
        uploader's own report got there before a restart; the upload writes the same bytes again.)"""
        ended = self.spool.ended(job_id)
        if ended is None or ended.get("status") not in ("Stopped", "Error", "Rejected"):
            return False
        self.spool.ack_result(job_id, failed=True)
        log.warning("job %s ended at the coordinator (%s) %s", job_id, ended.get("status"), what)
        return True

    def fail(self, job_id: str, error: UploadError) -> None:
        """Report a permanent upload failure as the job's error and stop retrying it."""
        self.spool.put_status(job_id, {"state": "error", "progress": 1.0,
                                       "message": f"uploading the model failed: {error.public}; the model owner's "
                                                  "uploader log has the details"}, source="uploader")
        self.spool.ack_result(job_id, failed=True)
        log.error("job %s: %s", job_id, error)

    def _say_waiting(self, job_id: str, public: str) -> None:
        """Show project members why the job is not completing (it stays Started meanwhile), once per reason: the
        output seat's "uploading the model" would otherwise look like a hang."""
        if self._waiting_said.get(job_id) == public:
            return
        self.spool.put_status(job_id, {"state": "running", "progress": 0.99,
                                       "message": f"uploading the model: {public}"}, source="uploader")
        self._waiting_said[job_id] = public

    def _refused(self, job_id: str, error: UploadError) -> None:
        """A refusal its operator can fix: keep the model and try again, until `REFUSED_KEPT_SECONDS` after its
        result came; then the job ends in Error."""
        try:
            age = time.time() - self.spool.result_path(job_id).stat().st_mtime
        except FileNotFoundError:
            return
        if age >= REFUSED_KEPT_SECONDS:
            self._refused_until.pop(job_id, None)
            self.fail(job_id, error)
            return
        self._refused_until[job_id] = time.monotonic() + REFUSED_RETRY_SECONDS
        said = (f"{error.public}; the model is kept and tried again every {REFUSED_RETRY_SECONDS:.0f} s until its "
                f"operator fixes it (at most {REFUSED_KEPT_SECONDS / 3600:.0f} h)")
        if self._waiting_said.get(job_id) != said:  # in the log once per reason, as on the seat
            log.error("job %s: %s; the model is kept and tried again every %.0f s, for %.0f h after the job's "
                      "computation ended (`supervisorctl restart uploader` tries at once)", job_id, error,
                      REFUSED_RETRY_SECONDS, REFUSED_KEPT_SECONDS / 3600)
        self._say_waiting(job_id, said)

    def cycle(self) -> bool:
        """Upload every pending result due; returns False if a store was unreachable, or the spool's volume refused
        a write (retry later)."""
        healthy = True
        away: dict[str, UploadUnavailable] = {}  # stores that failed in this cycle: their other results wait
        now = time.monotonic()
        for job_id in self.spool.pending_results():
            if self._refused_until.get(job_id, 0.0) > now:
                continue
            try:
                healthy = self._cycle_one(job_id, away) and healthy
            except OSError as exc:
                if exc.filename is None:  # not the spool's (its writes name their file): a bug, for supervisord
                    raise
                self._spool_refused(job_id, exc)
                healthy = False
        return healthy

    def _cycle_one(self, job_id: str, away: dict[str, UploadUnavailable]) -> bool:
        """Upload one job's result, or say why it waits; False if its store was unreachable."""
        if away and (waiting := away.get(self._bucket_uri(job_id))) is not None:
            self._say_waiting(job_id, f"{waiting.public}; trying again (the model is kept until it is stored)")
            return True
        try:
            self.upload(job_id)
            if (lasted := self._outage.recovered()) is not None:
                log.info("the model store takes models again (%s)", lasted)
        except UploadUnavailable as exc:
            if exc.bucket:
                away[exc.bucket] = exc
            self._outage.failed(f"job {job_id}: {exc}; trying again later (the result stays in the spool)")
            self._say_waiting(job_id, f"{exc.public}; trying again (the model is kept until it is stored)")
            return False
        except UploadError as exc:
            self._refused(job_id, exc)
            return True
        self._waiting_said.pop(job_id, None)
        self._refused_until.pop(job_id, None)
        if job_id in self._spool_said:
            self._spool_said.discard(job_id)
            log.info("job %s: the spool takes writes again", job_id)
        return True

    def _spool_refused(self, job_id: str, exc: OSError) -> None:
        """The spool's volume refused a write (full or read-only: a status to queue, an S3 upload's copy): the
        result stays and is tried again after the backoff, said once per job. Raised, it ended the uploader, and
        supervisord's restarts of it ended FATAL, stopping the whole worker."""
        if job_id not in self._spool_said:
            self._spool_said.add(job_id)
            log.error("job %s: cannot write the spool (%s: %s); the model is kept and tried again: %s", job_id,
                      exc.filename or self.spool.root, exc.strerror or exc, disk_advice(exc, "CAPE_SPOOL_DIR"))

    def _bucket_uri(self, job_id: str) -> str:
        """The store a pending result goes to ("" if that cannot be told now: its upload says why)."""
        try:
            return self.bucket_for(self.spool.read_result(job_id) or {}, job_id).uri
        except UploadError:
            return ""

    def run(self) -> None:
        """Watch the spool for results (a local directory: checked often and cheaply), backing off while the
        store is unreachable."""
        delay = SPOOL_WATCH_SECONDS
        while True:
            seen = self.spool.changes.generation
            if self.cycle():
                delay = SPOOL_WATCH_SECONDS
                self.spool.changes.wait(seen, delay)  # the runner's next result wakes it
            else:
                delay = min(MAX_BACKOFF_SECONDS, max(delay, min(self.config.poll_interval, RETRY_BASE_SECONDS)) * 2)
                time.sleep(delay)  # a store that failed is not retried sooner for a new result


def main() -> int:
    """Entry point of the supervisord program `uploader`."""
    return program.run("uploader", _upload)


def _upload(config: WorkerConfig) -> None:
    target = config.bucket.uri if config.bucket else "each job's model_location"
    log.info("uploading results to %s", target)
    spool = Spool(config.spool_dir)
    spool.remove_scratch(UPLOAD_SCRATCH_PREFIX)  # an upload's copy left by a kill; the result itself stays queued
    if moved := spool.move_old_upload_records():
        log.info("moved %d record(s) of stored models kept by an older version out of %s", moved,
                 spool.root / "results")
    with spool.watching("results"):
        Uploader(config, spool).run()


if __name__ == "__main__":
    from services.process_exit import run_then_exit

    run_then_exit(main)  # a stop does not wait for threads blocked on the network: see services/process_exit.py
