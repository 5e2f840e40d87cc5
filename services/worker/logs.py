"""Logging for the worker's programs: one line per event on stdout, optionally CloudWatch Logs via watchtower.

CloudWatch being down or slow must never block or stop a program: the boto3 client has short timeouts and one
attempt, the handler's constructor is guarded, its flush waits are bounded, and SIGTERM becomes a normal exit so
`logging.shutdown()` flushes the queued records (a default SIGTERM would lose them all). An exit whose unwinding
is stuck in a library's wait leaves after `STOP_GRACE_SECONDS`: stdout flushed, and CloudWatch given what it takes
within `LEAVE_FLUSH_SECONDS` more (the stuck wait may be CloudWatch's own flush, holding its handler).

watchtower reports each failed delivery attempt as a raw `WatchtowerWarning` on stderr from its delivery thread;
instead the program says once, in its own stdout format, that CloudWatch Logs stopped taking its records, and once
that it takes them again. Those lines never go to CloudWatch itself.
"""
from __future__ import annotations

import logging
import re
import signal
import sys
import threading
import time
import types
import warnings
from typing import Iterable, Mapping

from services.process_exit import exit_now

from .config import WorkerConfig

# Anything shaped like a Cape token (`<id>,<base64 secret>`) and any long base64 run: a last defence, on top of
# never passing secrets to a logger in the first place.
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{6,},[A-Za-z0-9+/_-]{16,}={0,2}")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
REDACTED = "[REDACTED]"
CLOUDWATCH_SEND_INTERVAL = 2  # seconds a record may wait in watchtower's queue before being sent
CLOUDWATCH_FLUSH_TIMEOUT = 3  # seconds flush()/close() wait per stream (watchtower's default is 30)
CLOUDWATCH_RETRY_SECONDS = 60.0  # while CloudWatch was unreachable at start, how often it is tried again
# After SIGTERM, how long a program may take to unwind before it leaves regardless; with the flush above it stays
# inside supervisord's stopwaitsecs (7), so a stop never needs the SIGKILL.
STOP_GRACE_SECONDS = 4.0
LEAVE_FLUSH_SECONDS = 1.5  # after the grace, how long the other handlers (CloudWatch) may take the last records
# Libraries whose DEBUG lines (watchdog: one per file event; botocore: every request) would bury the worker's own,
# and go to CloudWatch too: kept at WARNING whatever CAPE_LOG_LEVEL says.
_NOISY = ("botocore", "boto3", "urllib3", "s3transfer", "watchtower", "watchdog")
WATCHTOWER_TRIES = 5  # watchtower sends a batch this many times in a row, without pause, then drops it
# The delivery being made by this thread (watchtower sends each stream's batches from its own thread).
_delivering = threading.local()


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Replace known secrets and anything token-shaped in `text`."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    text = _BEARER.sub(r"\1" + REDACTED, text)
    return _TOKEN_SHAPE.sub(REDACTED, text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and traceback) with secrets removed, before any handler formats it."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage(), self.secrets)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        return True


class LineFormatter(logging.Formatter):
    """`2026-01-01T00:00:00.123Z poller INFO message` — UTC time, one line per event (tracebacks folded)."""

    converter = time.gmtime

    def __init__(self, program: str) -> None:
        super().__init__(f"%(asctime)s.%(msecs)03dZ {program} %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")


_setups = types.SimpleNamespace(count=0)  # how many times setup() ran in this process


def setup(program: str, config: WorkerConfig | None = None, stream=None) -> logging.Logger:
    """Configure the root logger for `program` and return the program's logger.

    With a config whose `cloudwatch` is on, records also go to the log group, stream `<worker>/<program>`.
    Installs a SIGTERM handler that exits normally so queued records are flushed.
    """
    root = logging.getLogger()
    _setups.count += 1  # a retry left by an earlier setup stops: these handlers replace its
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(config.log_level if config else "INFO")
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    redactor = RedactingFilter(config.secrets if config else ())

    console = logging.StreamHandler(stream or sys.stdout)
    console.setFormatter(LineFormatter(program))
    console.addFilter(redactor)
    root.addHandler(console)
    _setups.console = console
    logger = logging.getLogger(f"cape.{program}")

    if config is not None and config.cloudwatch:
        try:
            _attach_cloudwatch(config, program, redactor, console)
        except CloudWatchUnavailable as exc:
            logger.warning("CloudWatch Logs unreachable at start-up (group %s: %s); logging to stdout only until it "
                           "answers (tried again every %.0f s)", config.log_group, exc, CLOUDWATCH_RETRY_SECONDS)
            threading.Thread(target=_attach_cloudwatch_later, args=(config, program, redactor, console, logger,
                                                                    _setups.count),
                             name="cloudwatch-retry", daemon=True).start()
    _exit_normally_on_sigterm()
    return logger


def _attach_cloudwatch(config: WorkerConfig, program: str, redactor: logging.Filter,
                       console: logging.Handler) -> logging.Handler:
    """Send the root logger's records to CloudWatch too (the handler); raises CloudWatchUnavailable."""
    handler = cloudwatch_handler(config, program)
    handler.addFilter(redactor)
    handler.setFormatter(logging.Formatter(f"{program} %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        watch = _DeliveryWatch(handler, config.log_group, console)
    except AttributeError:  # a watchtower without the internals it follows: its raw warnings stay
        logging.getLogger(f"cape.{program}").debug(
            "CloudWatch delivery is not followed: this watchtower has no _submit_batch/cwl_client")
    else:
        _report_watchtower_warnings(watch)
    return handler


def _attach_cloudwatch_later(config: WorkerConfig, program: str, redactor: logging.Filter,
                             console: logging.Handler, logger: logging.Logger, setup_count: int) -> None:
    """CloudWatch was down when the program started (the network not up yet, an endpoint restarting): keep trying,
    so a long-running worker does not log to stdout only for the rest of its life."""
    while True:
        time.sleep(CLOUDWATCH_RETRY_SECONDS)
        if _setups.count != setup_count:
            return
        try:
            handler = _attach_cloudwatch(config, program, redactor, console)
        except CloudWatchUnavailable:
            continue
        if _setups.count != setup_count:  # set up anew while this attempt waited on the network: not ours now
            logging.getLogger().removeHandler(handler)
            handler.close()
            return
        logger.info("CloudWatch Logs answers now: logging to group %s again (earlier records are only in stdout)",
                    config.log_group)
        return


class CloudWatchUnavailable(RuntimeError):
    """CloudWatch Logs cannot be used now; the message is the reason (the error's class and AWS code and message,
    never a credential)."""


def cloudwatch_handler(config: WorkerConfig, program: str) -> logging.Handler:
    """A watchtower handler for stream `<worker>/<program>`; raises CloudWatchUnavailable if CloudWatch cannot be
    reached now."""
    import boto3
    import watchtower
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    # A call may take as long as a stop waits for it: a slow but answering endpoint (a busy machine at shutdown,
    # when every program flushes at once) still gets the last records. The stop itself is bounded by the waits
    # (FLUSH_TIMEOUT), not by these timeouts; a dead endpoint fails at connect.
    try:
        # Inside the try: making the client resolves the credentials and region (a missing AWS_PROFILE, a
        # credentials endpoint not up yet), which must not crash the program.
        client = boto3.client("logs", config=Config(connect_timeout=1, read_timeout=CLOUDWATCH_FLUSH_TIMEOUT,
                                                     retries={"total_max_attempts": 1, "mode": "standard"}),
                              # total_max_attempts: max_attempts counts retries (1 held each start 6 s, not 3)
                              **_logs_kwargs(config))
        handler = watchtower.CloudWatchLogHandler(
            create_log_group=True, log_group_name=config.log_group, log_stream_name=f"{config.worker_name}/{program}",
            boto3_client=client, send_interval=CLOUDWATCH_SEND_INTERVAL)
    except (BotoCoreError, ClientError) as exc:
        raise CloudWatchUnavailable(_aws_error_reason(exc)) from None
    handler.FLUSH_TIMEOUT = CLOUDWATCH_FLUSH_TIMEOUT  # bound flush()/close() so a slow endpoint cannot stall a stop
    return handler


def make_unless_there(create, **names: str) -> bool:  # type: ignore[no-untyped-def]
    """Call a CloudWatch Logs `create_log_group`/`create_log_stream`; False if it was there already."""
    try:
        create(**names)
    except create.__self__.exceptions.ResourceAlreadyExistsException:
        return False
    return True


# PutLogEvents answers 200 and drops events it will not keep, saying which in `rejectedLogEventsInfo` (AWS's API
# reference): too far ahead of its clock, older than 14 days, or older than the group's retention.
_REJECTED_FOR = (("tooNewLogEventStartIndex", "over 2 hours ahead of AWS's clock"),
                 ("tooOldLogEventEndIndex", "over 14 days old"),
                 ("expiredLogEventEndIndex", "older than the log group's retention"))


def rejected_for(info: Mapping[str, object]) -> str:
    """Why CloudWatch Logs dropped events of a batch it took, from the answer's `rejectedLogEventsInfo`."""
    return " or ".join(cause for key, cause in _REJECTED_FOR if key in info) or "outside what it keeps"


def _aws_error_reason(exc: Exception) -> str:
    """`ClientError AccessDeniedException: <AWS's message>`, or a botocore error's class and text (an endpoint, the
    name of a missing credential): what AWS or botocore said, which never holds a credential's value."""
    name = type(exc).__name__
    error = (getattr(exc, "response", None) or {}).get("Error") or {}
    if not error:
        return f"{name}: {exc}"
    code = error.get("Code", "?")
    kind = name if name == code else f"{name} {code}"  # botocore names a modelled error's class after its code
    return f"{kind}: {error.get('Message') or 'no message'}"


class _DeliveryWatch:
    """Follows one watchtower handler's batches and says on `console` (only there: a line about CloudWatch must not
    be sent to it) when CloudWatch Logs stops taking them, once until a batch is delivered again."""

    def __init__(self, handler: logging.Handler, log_group: str, console: logging.Handler) -> None:
        self.log_group = log_group
        self.console = console
        self.dropped = 0  # records dropped since the outage began; 0 while delivering (one stream: one thread)
        self.group_remade = False  # the group was found missing and made (or tried) in this outage
        self.rejections_said = False
        self._submit = handler._submit_batch
        handler._submit_batch = self._submit_batch  # watchtower's delivery thread calls it per batch
        self.client = handler.cwl_client
        events = handler.cwl_client.meta.events
        operation = f"{handler.cwl_client.meta.service_model.service_id.hyphenize()}.PutLogEvents"
        events.register(f"after-call.{operation}", self._answered)
        events.register(f"after-call-error.{operation}", self._not_answered)

    def say(self, level: int, msg: str, *args: object) -> None:
        """A line in the program's stdout format that does not pass the root logger (so not CloudWatch)."""
        if logging.getLogger().isEnabledFor(level):
            self.console.handle(logging.LogRecord("cape.cloudwatch", level, __file__, 0, msg, args, None))

    def _submit_batch(self, batch: list, *args: object, **kwargs: object) -> None:
        _delivering.watch, _delivering.delivered, _delivering.problem = self, False, "cannot be reached"
        _delivering.group_missing = False
        try:
            self._submit(batch, *args, **kwargs)
        finally:
            _delivering.watch = None
        if batch:
            self._settle(len(batch), _delivering.delivered, _delivering.problem)
        if _delivering.delivered:
            self.group_remade = False
        elif _delivering.group_missing and not self.group_remade:  # once per outage: the next batches would only
            self.group_remade = True                                 # repeat the call and its line
            self._make_group_again()

    def _make_group_again(self) -> None:
        """The log group was deleted under a running worker: watchtower makes only streams again, so without
        this every later batch would be dropped until a restart."""
        try:
            if not make_unless_there(self.client.create_log_group, logGroupName=self.log_group):
                return
        except Exception as exc:  # noqa: BLE001 -- AWS refusing or unreachable: the outage line already stands
            self.say(logging.WARNING, "CloudWatch Logs: log group %s does not exist and could not be made (%s); "
                                      "make it, or allow logs:CreateLogGroup", self.log_group, _aws_error_reason(exc))
            return
        self.say(logging.INFO, "CloudWatch Logs: log group %s had been deleted; made it again, the next records go "
                               "to it", self.log_group)

    def _settle(self, records: int, delivered: bool, problem: str) -> None:
        if delivered:
            if self.dropped:
                self.say(logging.INFO, "CloudWatch Logs delivery works again; the %d records dropped meanwhile are "
                                       "only in this log", self.dropped)
            self.dropped = 0
            return
        if not self.dropped:
            self.say(logging.WARNING, "CloudWatch Logs %s: each batch of records is tried %d times and then dropped, "
                                      "so log group %s misses them (this log has them) until delivery works again",
                     problem, WATCHTOWER_TRIES, self.log_group)
        self.dropped += records

    def _answered(self, http_response, parsed, **_: object) -> None:
        if http_response.status_code >= 300:
            error = parsed.get("Error", {})
            _delivering.problem = f"refuses the records ({error.get('Code')}: {error.get('Message')})"
            if error.get("Code") == "ResourceNotFoundException" and "group" in str(error.get("Message")).lower():
                _delivering.group_missing = True
            return
        _delivering.delivered = True
        if "rejectedLogEventsInfo" in parsed and not self.rejections_said:  # the same cause every time: say it once
            self.rejections_said = True
            self.say(logging.WARNING, "CloudWatch Logs rejected records of log group %s: their time stamps are %s; "
                                      "check this machine's clock", self.log_group,
                     rejected_for(parsed["rejectedLogEventsInfo"]))

    @staticmethod
    def _not_answered(exception: Exception, **_: object) -> None:
        _delivering.problem = f"cannot be reached ({exception})"


def _report_watchtower_warnings(watch: _DeliveryWatch) -> None:
    """Replace watchtower's raw warnings: a delivery's are summed up by its watch; the others (a stop that timed out
    delivering) become lines of `watch`'s program. Every other warning is shown as before."""
    import watchtower

    previous = getattr(warnings.showwarning, "not_watchtower", warnings.showwarning)  # setup() may run again

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, watchtower.WatchtowerWarning):
            previous(message, category, filename, lineno, file, line)
        elif getattr(_delivering, "watch", None) is None:
            watch.say(logging.WARNING, "CloudWatch Logs: %s", message)

    show.not_watchtower = previous
    warnings.showwarning = show


def _leave_now() -> None:
    """The stop's unwinding is stuck (s3transfer waits for a request in flight, an executor joins a blocked
    download, CloudWatch Logs does not take the last records): leave anyway, as a kill would, with stdout flushed.

    Not through `logging`: the stuck unwinding may be logging.shutdown() itself, which holds the CloudWatch
    handler's lock while it flushes, and a record logged here would wait for that lock past supervisord's SIGKILL.
    """
    console = getattr(_setups, "console", None)
    message = (f"still stopping after {STOP_GRACE_SECONDS:.0f} s (waiting on a request in flight or on CloudWatch "
               "Logs); leaving now, the work resumes at the next start")
    record = logging.LogRecord("cape.worker", logging.WARNING, __file__, 0, message, None, None)
    if console is not None:
        try:
            console.stream.write(console.format(record) + "\n")
        except (OSError, ValueError):
            pass

    def deliver() -> None:  # CloudWatch: the line and the queued records, if its handler is free to take them
        for handler in logging.getLogger().handlers:
            if handler is not console:
                try:
                    handler.handle(record)
                    handler.flush()
                except Exception:  # noqa: BLE001 -- leaving regardless
                    pass

    last = threading.Thread(target=deliver, name="last-records", daemon=True)
    last.start()
    last.join(LEAVE_FLUSH_SECONDS)
    exit_now(0, flush_logging=False)


def _logs_kwargs(config: WorkerConfig) -> dict[str, str]:
    return config.boto3_kwargs("logs")


def _exit_normally_on_sigterm() -> None:
    grace = threading.Timer(STOP_GRACE_SECONDS, _leave_now)
    grace.daemon = True

    def _on_sigterm(signum, frame):  # noqa: ARG001
        if grace.ident is None:  # a repeated signal keeps the first deadline
            grace.start()
        raise SystemExit(0)  # unwinds `main()` so logging.shutdown() flushes queued records

    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. under a test runner): leave signals alone
        pass
