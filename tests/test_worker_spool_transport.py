"""The spool transport: arrays sealed into the outbox once, read back from the inbox, bounded waits."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import threading
import time

import numpy as np
import pytest

from services.mpc import ProtocolError, TransportTimeout
from services.mpc.transport import Expected
from services.worker.job_spec import JobSpec, JobSpecError
from services.worker.keepalive import KeepAlives, interval_for, is_keepalive_name, keepalive_name
from services.worker.keys import WorkerKeys
from services.worker.partner_wait import LIMIT_TIMEOUTS
from services.worker.sealing import MessageAddress, SealedMessage
from services.worker.spool import Spool, atomic_writer
from services.worker.spool_transport import JobInterrupted, SpoolTransport, wire_name
from tests.support.worker_messaging import wait_for
from tests.support.worker_messaging import worker_job as support_worker_job

JOB = "feedfacefeedfacefeedfacefeedface"
SEATS = ("x_owner", "y_owner", "helper")


def worker_job(keys: dict[str, WorkerKeys], seat: str) -> dict:
    return support_worker_job({s: keys[s] for s in SEATS}, seat, JOB)


@pytest.fixture
def world(tmp_path):
    keys = {s: WorkerKeys.load_or_create(tmp_path / s / "state") for s in SEATS}
    spools = {s: Spool(tmp_path / s / "spool") for s in SEATS}
    specs = {s: JobSpec.parse(worker_job(keys, s)) for s in SEATS}
    return keys, spools, specs


def deliver(world, frm: str, to: str) -> int:
    """What the two messengers do, minus the broker: open each sealed outbox file into the recipient's inbox."""
    keys, spools, specs = world
    moved = 0
    for item in spools[frm].pending_outbox():
        if item.to_seat != to:
            continue
        with open(item.path, "rb") as source, atomic_writer(spools[to].inbox_path(JOB, item.name)) as out:
            SealedMessage.open(source, out, MessageAddress(JOB, frm, to, item.name), keys[to].encryption,
                               specs[to].parties[frm].signing_key)
        spools[frm].mark_sent(item)
        moved += 1
    return moved


def test_arrays_roundtrip_with_dtype_and_shape(world):
    keys, spools, specs = world
    x = SpoolTransport(spools["x_owner"], specs["x_owner"], keys["x_owner"])
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"])
    arrays = [np.arange(12, dtype=np.uint64).reshape(3, 4), np.array([1.5, -2.0]), np.zeros((0, 3)),
              np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.arange(10)[::2]]
    for i, array in enumerate(arrays):
        x.send(1, f"m{i}", array)
    x.flush()
    assert deliver(world, "x_owner", "y_owner") == len(arrays)
    for i, array in enumerate(arrays):
        got = y.receive(0, f"m{i}")
        np.testing.assert_array_equal(got, array)
        assert got.dtype == array.dtype and got.shape == array.shape
    assert x.messages_sent == len(arrays) and y.messages_received == len(arrays)


def test_a_message_of_another_shape_is_refused_before_its_data_is_read(world, monkeypatch):
    """A peer's (N, 1) where a (d,) share is expected: refused from the header, the data never allocated."""
    keys, spools, specs = world
    x = SpoolTransport(spools["x_owner"], specs["x_owner"], keys["x_owner"])
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"])
    x.send(1, "share", np.zeros((50_000, 1), dtype=np.uint64))
    x.send(1, "count", np.array([7.0]))
    x.flush()
    deliver(world, "x_owner", "y_owner")
    reads = []
    real_read_array = np.lib.format.read_array
    monkeypatch.setattr(np.lib.format, "read_array", lambda *a, **k: reads.append(1) or real_read_array(*a, **k))
    with pytest.raises(ProtocolError, match=r"the x_owner worker \(organization org-x_owner\) sent message 'share' as "
                                            r"uint64 \(50000, 1\), expected uint64 \(32,\)"):
        y.receive(0, "share", Expected((32,), np.dtype(np.uint64)))
    assert reads == []
    with pytest.raises(ProtocolError, match=r"'count' as float64 \(1,\), expected int64 \(1,\)"):
        y.receive(0, "count", Expected((1,), np.dtype(np.int64)))
    np.testing.assert_array_equal(y.receive(0, "count", Expected((1,), np.dtype(np.float64))), [7.0])


def _npy(array: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


@pytest.mark.parametrize("body", [
    _npy(np.arange(96, dtype=np.uint64).reshape(32, 3))[:-100],  # the header promises more than there is
    b"not an array at all",
    b"",
    b"\x93NUMPY\x02\x00" + (200_000).to_bytes(4, "little") + b"{" * 200_000,  # a header numpy will not parse
], ids=["cut-short", "garbage", "empty", "huge-header"])
def test_a_partners_message_that_is_not_a_whole_array_ends_the_job_naming_that_worker(world, body, caplog):
    """A genuine (verified) message whose content is no array: a typed protocol error that names the sender, not
    the runner's 'failed unexpectedly (ValueError)'; numpy's own words, which quote the header, stay in the log."""
    keys, spools, specs = world
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"], timeout=5)
    wire = wire_name("x_owner", "share")
    with atomic_writer(spools["y_owner"].inbox_path(JOB, wire)) as out:  # as the messenger places it once verified
        out.write(body)
    started = time.monotonic()
    with pytest.raises(ProtocolError, match=r"the x_owner worker \(organization org-x_owner\) sent message 'share' "
                                            r"that is not a whole array") as raised:
        y.receive(0, "share", Expected((32, 3), np.dtype(np.uint64)))
    assert time.monotonic() - started < 2  # at once, not after the job's timeout
    assert "{{{{" not in str(raised.value)
    assert f"message {wire} from the x_owner worker is not a readable array" in caplog.text


def test_a_large_received_array_is_read_only_and_its_inbox_file_leaves_the_page_cache(world, monkeypatch):
    keys, spools, specs = world
    x = SpoolTransport(spools["x_owner"], specs["x_owner"], keys["x_owner"])
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"])
    large = np.arange(300_000, dtype=np.uint64).reshape(100_000, 3)  # 2.4 MB: its cached pages are dropped
    small = np.arange(10, dtype=np.uint64)
    x.send(1, "large", large)
    x.send(1, "small", small)
    x.flush()
    deliver(world, "x_owner", "y_owner")
    advice = []
    real_fadvise = os.posix_fadvise

    def spy(fd, offset, length, what):  # records which file was advised what, then gives the kernel the advice
        advice.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, what))
        real_fadvise(fd, offset, length, what)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    got = y.receive(0, "large")
    np.testing.assert_array_equal(got, large)
    assert not isinstance(got, np.memmap) and not got.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        got[0, 0] = 1  # the engine never writes to a received array; if it did, it would fail loudly
    inbox = spools["y_owner"].inbox_path(JOB, "x_owner.large")
    assert advice == [(str(inbox), 0, 0, os.POSIX_FADV_DONTNEED)]
    assert inbox.stat().st_size > 2_400_000  # the file stays, for a replay
    assert y.receive(0, "large").flags.writeable is False  # a replay reads it again, from disk
    advice.clear()
    assert y.receive(0, "small").flags.writeable  # small ones are read as they are, the cache left alone
    assert advice == []


def test_sending_again_keeps_the_first_ciphertext(world):
    keys, spools, specs = world
    x = SpoolTransport(spools["x_owner"], specs["x_owner"], keys["x_owner"])
    x.send(2, "r1", np.arange(5))
    x.flush()
    path = spools["x_owner"].outbox_path(JOB, "helper", "x_owner.r1")
    first = path.read_bytes()
    replayed = SpoolTransport(spools["x_owner"], specs["x_owner"], keys["x_owner"])  # a restarted runner
    replayed.send(2, "r1", np.arange(5))
    replayed.flush()
    assert path.read_bytes() == first and replayed.messages_sent == 0
    deliver(world, "x_owner", "helper")  # sent and marked .sent: still not sealed again
    replayed.send(2, "r1", np.arange(5))
    assert spools["x_owner"].pending_outbox() == []


def test_receive_waits_for_a_late_message(world):
    keys, spools, specs = world
    x = SpoolTransport(spools["x_owner"], specs["x_owner"], keys["x_owner"])
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"])
    timer = threading.Timer(0.3, lambda: (x.send(1, "late", np.ones(3)), x.flush(),
                                          deliver(world, "x_owner", "y_owner")))
    timer.start()
    np.testing.assert_array_equal(y.receive(0, "late"), np.ones(3))
    timer.join()


def test_receive_times_out_naming_the_sender(world):
    keys, spools, specs = world
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"], timeout=0.2)
    started = time.monotonic()
    with pytest.raises(TransportTimeout, match=r"no message 'helper.r9' from the helper worker \(organization "
                                                r"org-helper\) within 0.2 s"):
        y.receive(2, "r9")
    assert time.monotonic() - started < 2


def test_a_wait_that_ends_quotes_what_this_workers_own_messenger_reports(world, tmp_path):
    """A broker away (a paused VM) longer than the timeout ended the job blaming the partner, which had sent all
    along: the waiting worker's own messenger had recorded the broker unreachable, and the error did not say so."""
    from services.worker import health

    keys, spools, specs = world
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert health.messenger_trouble(run_dir) is None and health.messenger_trouble(None) is None
    health.BROKER_UNREACHABLE.record(run_dir, f"cannot reach the broker at http://127.0.0.1:9 (see {tmp_path})")
    health.SPOOL_SHORT_OF_ROOM.record(run_dir, f"message m of job j waits at the broker: {tmp_path}/spool is full")
    trouble = health.messenger_trouble(run_dir)
    assert re.fullmatch(r"the broker is unreachable or failing; messages wait and the messenger retries \(since "
                        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\); the spool volume is short of room or refuses writes; "
                        r"messages wait at the broker \(since [^)]+\)", trouble), trouble
    assert str(tmp_path) not in trouble  # the records' own messages can name local paths: not for the job's error
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"], timeout=0.2,
                       own_trouble=lambda: health.messenger_trouble(run_dir))
    with pytest.raises(TransportTimeout) as caught:
        y.receive(2, "r9")
    assert f"; meanwhile this worker's own messenger reports: {trouble}" in str(caught.value)


def test_a_long_wait_says_on_the_seat_what_this_workers_own_messenger_reports(world, monkeypatch):
    """A message held on this side (the spool short of room, the broker away from here) showed nothing on the seat:
    the people following the job saw it wait, with no word of which worker held it up, until the timeout."""
    from services.worker import spool_transport

    monkeypatch.setattr(spool_transport, "OWN_TROUBLE_LOOK_SECONDS", 0.05)
    keys, spools, specs = world
    reports: list[str | None] = [None]
    said: list[tuple[str, str | None, bool]] = []
    x = SpoolTransport(spools["x_owner"], specs["x_owner"], keys["x_owner"])
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"], timeout=5,
                       own_trouble=lambda: reports[-1],
                       own_trouble_changed=lambda seat, trouble, waiting: said.append((seat, trouble, waiting)))
    steps = [threading.Timer(0.2, reports.append, args=("the spool volume is short of room: it has 300 MiB free",)),
             threading.Timer(0.35, reports.append, args=("the spool volume is short of room: it has 290 MiB free",)),
             threading.Timer(0.5, reports.append, args=(None,)),
             threading.Timer(0.6, reports.append, args=("the broker did not answer",)),
             threading.Timer(0.8, lambda: (x.send(1, "late", np.ones(3)), x.flush(),
                                           deliver(world, "x_owner", "y_owner")))]
    for step in steps:
        step.start()
    np.testing.assert_array_equal(y.receive(0, "late"), np.ones(3))
    for step in steps:
        step.join()
    # Each change once: the free space counting down is no new report (a status every 5 s for each waiting job);
    # and the wait's end, which what the seat said of it would outlive.
    assert said == [("x_owner", "the spool volume is short of room: it has 300 MiB free", True),
                    ("x_owner", None, True), ("x_owner", "the broker did not answer", True), ("x_owner", None, False)]


class SuspendedClock:
    """`time.monotonic()` of a machine that may be suspended: `suspend(s)` makes s seconds pass at once."""

    def __init__(self) -> None:
        self.lost = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.lost

    def suspend(self, seconds: float) -> None:
        self.lost += seconds


def test_a_worker_resumed_after_its_timeout_waits_for_what_its_messenger_brings_in(world, monkeypatch):
    """A machine suspended past the wait's deadline: the partner's message, sent meanwhile, is at the broker until
    the messenger (suspended too) brings it in, a moment after the runner looks again. It gave up on resuming, and
    blamed the partner."""
    from services.worker import spool_transport

    keys, spools, specs = world
    clock = SuspendedClock()
    monkeypatch.setattr(spool_transport, "time", clock)
    x = SpoolTransport(spools["x_owner"], specs["x_owner"], keys["x_owner"])
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"], timeout=2.0)
    suspend = threading.Timer(0.3, clock.suspend, args=(30.0,))
    messenger = threading.Timer(0.8, lambda: (x.send(1, "late", np.ones(3)), x.flush(),
                                              deliver(world, "x_owner", "y_owner")))
    suspend.start()
    messenger.start()
    try:
        np.testing.assert_array_equal(y.receive(0, "late"), np.ones(3))
    finally:
        suspend.join()
        messenger.join()


def test_a_partner_silent_after_a_resume_is_given_up_a_timeout_later(world, monkeypatch):
    from services.worker import spool_transport

    keys, spools, specs = world
    clock = SuspendedClock()
    monkeypatch.setattr(spool_transport, "time", clock)
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"], timeout=0.5)
    suspend = threading.Timer(0.2, clock.suspend, args=(30.0,))
    started = time.monotonic()  # before the timer starts: measured after it, the bound was missed by 2 ms
    suspend.start()
    with pytest.raises(TransportTimeout, match=r"no message 'helper.r9' from the helper worker"):
        y.receive(2, "r9")
    suspend.join()
    assert time.monotonic() - started >= 0.2 + 0.5 - 0.01  # a timer may wake a hair early


def test_a_timeout_on_a_spool_short_of_room_says_how_much_is_free(world, tmp_path):
    """The messenger leaves messages at the broker below its reserve: the runner's timeout says the free space, and
    only then (low free space alone, said whether a message waited or not, read as the cause)."""
    from services.worker import health

    keys, spools, specs = world
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    low = 300 * 1024**2
    assert health.messenger_trouble(run_dir, low) is None
    health.SPOOL_SHORT_OF_ROOM.record(run_dir, "message m of job j waits at the broker")
    assert re.fullmatch(r"the spool volume is short of room or refuses writes; messages wait at the broker "
                        r"\(since [^)]+\)", health.messenger_trouble(run_dir, 2 * 1024**3))  # room enough: not said
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"], timeout=0.1,
                       own_trouble=lambda: health.messenger_trouble(run_dir, low))
    with pytest.raises(TransportTimeout, match=r"the spool volume is short of room or refuses writes; messages wait "
                                                r"at the broker \(since [^)]+\): it has 300 MiB free, and the "
                                                r"messenger leaves messages at the broker rather than go below 256 MiB"):
        y.receive(2, "r9")


def test_receive_stops_when_interrupted(world):
    keys, spools, specs = world
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"], timeout=30,
                       interrupted=lambda: "the coordinator ended the job (Stopped)")
    with pytest.raises(JobInterrupted, match="Stopped"):
        y.receive(0, "r1")


def test_wire_names_are_safe_and_agree():
    assert wire_name("x_owner", "reveal.3") == "x_owner.reveal.3"
    odd = wire_name("x_owner", "lr/v/M-S/0")
    assert odd.startswith("x_owner.lr-v-M-S-0.h") and odd == wire_name("x_owner", "lr/v/M-S/0")
    assert wire_name("x_owner", "a/b") != wire_name("x_owner", "a:b")
    assert wire_name("helper", "///").startswith("helper.h")
    assert wire_name("x_owner", "a" * 300) != wire_name("x_owner", "a" * 301)


def test_a_bad_worker_job_names_the_field(world):
    keys, _, _ = world
    raw = worker_job(keys, "x_owner")
    raw["parties"]["helper"]["signing_public_key"] = "AAAA"
    with pytest.raises(JobSpecError, match="parties.helper"):
        JobSpec.parse(raw)
    with pytest.raises(JobSpecError, match="job id"):
        JobSpec.parse({**worker_job(keys, "x_owner"), "id": "../../etc"})



@pytest.mark.parametrize("change, message", [
    ({"parties": ["x_owner"]}, "parties must be an object"),
    ({"parties": {"x_owner": "org"}}, "parties.x_owner must be an object"),
    ({"task": {"x": "a", "y": {}}}, "task must have x and y, each an object"),
    ({"timeout": "nan"}, "timeout must be a number of seconds from 1 to 604800"),
    ({"timeout": float("inf")}, "timeout must be"),
    ({"timeout": -5}, "timeout must be"),
    ({"timeout": "soon"}, "timeout must be"),
])
def test_a_malformed_worker_job_is_a_job_spec_error_not_a_crash(world, change, message):
    """From a buggy coordinator: each a JobSpecError (a NaN timeout made every wait of the job unbounded)."""
    keys, _, _ = world
    with pytest.raises(JobSpecError, match=message):
        JobSpec.parse({**worker_job(keys, "x_owner"), **change})
    with pytest.raises(JobSpecError, match="not a JSON object"):
        JobSpec.parse(["a list"])  # type: ignore[arg-type]


def test_background_writes_keep_send_order_and_flush_makes_them_durable(world):
    keys, spools, specs = world
    x = SpoolTransport(spools["x_owner"], specs["x_owner"], keys["x_owner"], write_ahead=2)
    arrays = [np.full(50_000, i, dtype=np.uint64) for i in range(8)]
    for i, array in enumerate(arrays):
        x.send(1, f"block{i}", array)
    x.flush()
    # the messenger sends oldest first: the outbox order is the send order
    assert [item.name for item in spools["x_owner"].pending_outbox()] == [f"x_owner.block{i}" for i in range(8)]
    assert x.messages_sent == 8
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"])
    deliver(world, "x_owner", "y_owner")
    for i, array in enumerate(arrays):
        np.testing.assert_array_equal(y.receive(0, f"block{i}"), array)
    x.close()


def test_a_failed_outbox_write_is_raised_in_the_engines_thread(world):
    keys, spools, specs = world
    (spools["x_owner"].root / "outbox" / JOB).write_bytes(b"")  # the job's outbox cannot be made: every write fails
    x = SpoolTransport(spools["x_owner"], specs["x_owner"], keys["x_owner"])
    with pytest.raises(OSError):
        x.send(1, "a", np.ones(3))
        x.flush()
    with pytest.raises(OSError):  # the failure sticks: the job must not go on without its messages
        x.send(1, "b", np.ones(3))
    x.close()


_SENDER = """
import json, os, sys
import numpy as np
from services.worker.job_spec import JobSpec
from services.worker.keys import WorkerKeys
from services.worker.spool import Spool
from services.worker.spool_transport import SpoolTransport
base, spec = sys.argv[1], json.loads(sys.argv[2])
transport = SpoolTransport(Spool(base + "/spool"), JobSpec.parse(spec), WorkerKeys.load_or_create(base + "/state"))
for i in range(40):
    transport.send(1, f"block{i}", np.full(200_000, i, dtype=np.uint64))
    if i == 10:
        print("sent", flush=True)
transport.flush()
"""


def test_kill_9_while_writing_in_the_background_then_replay_gives_every_message_once(world, tmp_path):
    import json
    import subprocess
    import sys

    keys, spools, specs = world
    spec = worker_job(keys, "x_owner")
    outbox = spools["x_owner"].root / "outbox" / JOB / "y_owner"
    proc = subprocess.Popen([sys.executable, "-c", _SENDER, str(tmp_path / "x_owner"), json.dumps(spec)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "sent"
        proc.kill()  # kill -9 with sends queued and a write in progress
    finally:
        proc.wait(timeout=30)
    before = {p.name: p.read_bytes() for p in outbox.glob("*.sealed")}
    assert 0 < len(before) < 40
    # the replay (a restarted runner) writes what was missing and leaves what was durable as it was
    replay = SpoolTransport(spools["x_owner"], specs["x_owner"], keys["x_owner"])
    for i in range(40):
        replay.send(1, f"block{i}", np.full(200_000, i, dtype=np.uint64))
    replay.flush()
    replay.close()
    assert replay.messages_sent == 40 - len(before)
    spools["x_owner"].sweep_temp(older_than=0)
    after = {p.name: p.read_bytes() for p in outbox.iterdir()}
    assert sorted(after) == sorted(f"x_owner.block{i}.sealed" for i in range(40))
    assert all(after[name] == data for name, data in before.items())
    assert deliver(world, "x_owner", "y_owner") == 40
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"])
    for i in range(40):
        assert y.receive(0, f"block{i}")[0] == i


# ---- keep-alives: a partner still preparing keeps a wait going (keepalive.py, partner_wait.py) -------------------

T = 0.8  # the job's timeout in these tests: keep-alives every 0.2 s


@contextlib.contextmanager
def delivering(world):
    """Both ways between every two seats, every 10 ms, as the messengers and the broker do."""
    stop = threading.Event()

    def run():
        while not stop.wait(0.01):
            for frm in SEATS:
                for to in SEATS:
                    if frm != to:
                        deliver(world, frm, to)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def preparing_x(world, stop: threading.Event) -> tuple[KeepAlives, JobSpec]:
    keys, spools, specs = world
    return KeepAlives(spools["x_owner"], keys["x_owner"], stop), dataclasses.replace(specs["x_owner"], timeout=T)


def assert_keepalives_numbered(names, first: int, count: int) -> None:
    """`names` hold the keep-alives numbered `first` to `first + count - 1`, and maybe the next one, which was being
    written as they ended (not counted: not every partner may have it)."""
    numbers = sorted(int(name.rsplit(".", 1)[1]) for name in names if is_keepalive_name(name))
    assert numbers in (list(range(first, first + count)), list(range(first, first + count + 1))), numbers


def test_a_partner_still_preparing_keeps_the_wait_going_past_the_timeout_and_says_why(world):
    keys, spools, specs = world
    stop = threading.Event()
    keepalives, x_spec = preparing_x(world, stop)
    said = []
    x = SpoolTransport(spools["x_owner"], x_spec, keys["x_owner"], sending=lambda: keepalives.end(JOB))
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"], timeout=T,
                       partner_preparing=lambda *args: said.append(args))
    try:
        with delivering(world):
            keepalives.begin(x_spec, "queued at its worker: all 4 of the worker's job slots are taken")
            threading.Timer(1.5 * T, keepalives.phase, (JOB, "loading its data: 12 of 40 MiB")).start()
            late = threading.Timer(3 * T, lambda: (x.send(1, "late", np.ones(3)), x.flush()))
            late.start()
            started = time.monotonic()
            np.testing.assert_array_equal(y.receive(0, "late"), np.ones(3))
            waited = time.monotonic() - started
            late.join()
            sent = keepalives.sent
            time.sleep(3 * interval_for(T))
    finally:
        stop.set()
    assert waited >= 2.5 * T
    assert [seat for seat, _, _ in said] == ["x_owner"] * len(said) and 2 <= len(said) <= 4, said
    assert said[0][1] == "queued at its worker: all 4 of the worker's job slots are taken"
    assert said[-1][1] == "loading its data: 12 of 40 MiB" and said[-1][2] >= 2 * T
    # From its first message on, the late seat sends no keep-alive; each went to both partners, sealed.
    assert keepalives.sent == sent >= 8
    for to in ("y_owner", "helper"):
        assert_keepalives_numbered(spools["x_owner"].outbox_names(JOB, to), 1, sent)
    assert json.loads(spools["helper"].inbox_path(JOB, "x_owner.preparing.1").read_bytes()) == {
        "phase": "queued at its worker: all 4 of the worker's job slots are taken"}


def y_waits_while_x_prepares(world, phase: str, silent_after: float | None = None) -> tuple[str, float]:
    """The y-owner waits for the x-owner's `r1`, which never comes, while the x-owner says it is `phase` (until
    `silent_after` seconds); the timeout's message and how long the wait lasted."""
    keys, spools, specs = world
    stop = threading.Event()
    keepalives, x_spec = preparing_x(world, stop)
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"], timeout=T)
    try:
        with delivering(world):
            keepalives.begin(x_spec, phase)
            if silent_after is not None:
                threading.Timer(silent_after, keepalives.end, (JOB,)).start()
            started = time.monotonic()
            with pytest.raises(TransportTimeout) as caught:
                y.receive(0, "r1")
            return str(caught.value), time.monotonic() - started
    finally:
        stop.set()


def test_a_partner_whose_keep_alives_stop_is_given_up_within_two_timeouts(world):
    # its runner is gone after 1.5 timeouts (kill -9, a machine down)
    message, waited = y_waits_while_x_prepares(world, "loading its data: 1 of 300 MiB", silent_after=1.5 * T)
    assert 2 * T <= waited < 1.5 * T + 2 * T + 1.0
    assert message == ("no message 'x_owner.r1' from the x_owner worker (organization org-x_owner): it said it was "
                       "still preparing (loading its data: 1 of 300 MiB), then nothing came from it for "
                       f"{T:g} s; check that worker is running and reaches the broker")


def test_a_partner_that_keeps_preparing_for_ever_is_given_up_at_the_limit(world):
    message, waited = y_waits_while_x_prepares(world, "queued at its worker behind an older job")
    assert LIMIT_TIMEOUTS * T <= waited < LIMIT_TIMEOUTS * T + 1.0
    assert message.startswith(
        f"no message 'x_owner.r1' from the x_owner worker (organization org-x_owner) within {LIMIT_TIMEOUTS * T:g} "
        f"s, {LIMIT_TIMEOUTS} times the job's timeout and the longest a wait lasts, although it kept saying it was "
        "still preparing (queued at its worker behind an older job); give such jobs a longer timeout"), message


def test_keep_alives_from_before_a_wait_or_from_another_seat_do_not_prolong_it(world):
    keys, spools, specs = world
    stop = threading.Event()
    keepalives, x_spec = preparing_x(world, stop)
    helper_keepalives = KeepAlives(spools["helper"], keys["helper"], stop)
    y = SpoolTransport(spools["y_owner"], specs["y_owner"], keys["y_owner"], timeout=T)
    try:
        keepalives.begin(x_spec, "queued")
        with delivering(world):
            wait_for(lambda: spools["y_owner"].inbox_names(JOB), "a keep-alive from x_owner")
        keepalives.end(JOB)
        deliver(world, "x_owner", "y_owner")
        helper_keepalives.begin(dataclasses.replace(specs["helper"], timeout=T), "queued")
        with delivering(world):
            started = time.monotonic()
            with pytest.raises(TransportTimeout, match=rf"within {T:g} s; check that worker is running and reaches "
                                                        r"the broker \(a worker still queued for a job slot or "
                                                        r"loading its data says so to its partners, which then wait "
                                                        r"longer: nothing came from it\)$"):
                y.receive(0, "r1")
            waited = time.monotonic() - started
    finally:
        stop.set()
    assert T <= waited < T + 1.0
    assert any(name.startswith("helper.preparing.") for name in spools["y_owner"].inbox_names(JOB))


def test_keep_alive_numbers_go_on_after_a_restart_and_a_replay_does_not_stop_them(world):
    """A restarted runner never reuses a keep-alive's name (the broker writes a name once), and it keeps telling its
    partners while it replays the messages it had sent before (they wait for its next one)."""
    keys, spools, specs = world
    stop = threading.Event()
    keepalives, x_spec = preparing_x(world, stop)
    try:
        keepalives.begin(x_spec, "loading its data")
        wait_for(lambda: keepalives.sent >= 2, "two keep-alives")
        sent = SpoolTransport(spools["x_owner"], x_spec, keys["x_owner"], sending=lambda: keepalives.end(JOB))
        sent.send(1, "r1", np.ones(2))
        sent.close()
        first = set(spools["x_owner"].outbox_names(JOB, "y_owner"))
        restarted, _ = preparing_x(world, stop)  # the runner's restart
        restarted.begin(x_spec, "replaying its role after a restart: loading its data")
        replay = SpoolTransport(spools["x_owner"], x_spec, keys["x_owner"], sending=lambda: restarted.end(JOB))
        replay.send(1, "r1", np.ones(2))  # written before: not sealed again, and no end to the keep-alives
        wait_for(lambda: restarted.sent >= 2, "keep-alives after the restart")
        replay.send(1, "r2", np.ones(2))  # its first new message
        replay.close()
        count = restarted.sent
        time.sleep(3 * interval_for(T))
    finally:
        stop.set()
    assert restarted.sent == count
    assert_keepalives_numbered(set(spools["x_owner"].outbox_names(JOB, "y_owner")) - first,
                               max(int(name.rsplit(".", 1)[1]) for name in first if is_keepalive_name(name)) + 1,
                               count)


def test_a_keep_alive_too_large_to_be_one_is_not_read_whole(world):
    """A partner's keep-alive that reached the inbox (an older messenger took it) yet holds 64 MiB: the wait reads
    a bounded prefix, says no phase, and still counts it as a sign of life; reading it whole took gigabytes."""
    import tracemalloc

    from services.worker.keepalive import PartnerKeepAlives

    keys, spools, specs = world
    alive = PartnerKeepAlives(spools["y_owner"], JOB, "x_owner")
    with atomic_writer(spools["y_owner"].inbox_path(JOB, keepalive_name("x_owner", 1))) as out:
        out.write(json.dumps({"phase": "A" * (64 << 20)}).encode())
    tracemalloc.start()
    try:
        fresh = alive.fresh()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fresh == [keepalive_name("x_owner", 1)] and alive.heard and alive.phase is None
    assert peak < 1 << 20


def test_an_engine_message_never_takes_a_keep_alives_name():
    assert wire_name("x_owner", "preparing.3") != "x_owner.preparing.3"
    assert not is_keepalive_name(wire_name("x_owner", "preparing.3"))
    assert is_keepalive_name(keepalive_name("helper", 12)) and not is_keepalive_name("helper.preparing.x")


def test_a_keep_alive_that_reached_one_partner_before_the_spool_filled_is_not_sealed_again_for_it(world, monkeypatch):
    """A full spool refused a keep-alive's write for the second partner after the first one's was written and
    sent: the next try sealed the first one's again, with other bytes under the same name (the broker refused it,
    and the messenger retried it for the rest of the job; or, once fetched, the partner recorded a forged second
    copy). Seen on a full tmpfs spool: 'the broker holds other bytes under this name; retrying'."""
    import errno

    from services.worker import keepalive as keepalive_mod

    keys, spools, specs = world
    keepalives, x_spec = preparing_x(world, threading.Event())
    first_seat, second_seat = [seat for seat in x_spec.parties if seat != "x_owner"]
    real_writer = keepalive_mod.atomic_writer
    full = [True]

    def writer(final, **kwargs):
        if full[0] and final.parent.name == second_seat:
            raise OSError(errno.ENOSPC, "No space left on device", str(final))
        return real_writer(final, **kwargs)

    monkeypatch.setattr(keepalive_mod, "atomic_writer", writer)
    preparing = keepalive_mod._Preparing(x_spec, "loading its data", 0.0)
    keepalives._send(preparing)
    assert [(i.to_seat, i.name) for i in spools["x_owner"].pending_outbox()] == [(first_seat, "x_owner.preparing.1")]
    assert deliver(world, "x_owner", first_seat) == 1  # the messenger sent it (renamed .sent)
    full[0] = False  # space is freed
    keepalives._send(preparing)
    assert [(i.to_seat, i.name) for i in spools["x_owner"].pending_outbox()] == [(second_seat, "x_owner.preparing.1")]
    assert keepalives.sent == 1 and preparing.number == 2

