"""The spool: atomic hand-offs, crash leftovers ignored, strict names, the queues the programs share."""
from __future__ import annotations

import os
import time

import pytest

from services.worker.spool import (
    InvalidName,
    OutboxItem,
    Spool,
    atomic_write_bytes,
    atomic_writer,
    validate_job_id,
    validate_message_name,
    validate_seat,
)

JOB = "0123456789abcdef0123456789abcdef"


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "file.json"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["file.json"]


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_writer(target) as handle:
            handle.write(b"partial")
            raise RuntimeError("crash in the middle")
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_first_writer_wins_without_overwrite(tmp_path):
    target = tmp_path / "msg.sealed"
    atomic_write_bytes(target, b"genuine", overwrite=False)
    atomic_write_bytes(target, b"second try", overwrite=False)
    assert target.read_bytes() == b"genuine"
    assert os.listdir(tmp_path) == ["msg.sealed"]


def test_torn_temp_files_are_ignored_by_every_reader(tmp_path):
    spool = Spool(tmp_path)
    spool.put_job({"id": JOB, "seat": "x_owner"})
    spool.put_status(JOB, {"state": "started", "progress": 0})
    # what a writer killed mid-write leaves: dot-prefixed temp files in each stage directory
    for folder in (spool.job_dir("torn1"), tmp_path / "status" / JOB, tmp_path / "outbox" / JOB / "y_owner",
                   tmp_path / "inbox" / JOB, tmp_path / "results" / JOB):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".spec.json.abc123.tmp").write_bytes(b'{"id": "tor')
    assert spool.job_ids() == [JOB]
    assert [item.read() for item in spool.pending_status()] == [{"state": "started", "progress": 0}]
    assert spool.pending_outbox() == []
    assert spool.pending_results() == []
    assert not spool.inbox_path(JOB, "x_owner.m1").exists()


def test_sweep_removes_only_old_temp_files(tmp_path):
    spool = Spool(tmp_path)
    old = tmp_path / "inbox" / ".a.msg.111111.tmp"
    new = tmp_path / "inbox" / ".b.msg.222222.tmp"
    keep = tmp_path / "inbox" / "c.msg"
    for path in (old, new, keep):
        path.write_bytes(b"x")
    past = time.time() - 7200
    os.utime(old, (past, past))
    assert spool.sweep_temp(older_than=3600) == 1
    assert not old.exists() and new.exists() and keep.exists()


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", ".hidden", "a b", "x" * 129, "é", None, 5])
def test_job_ids_from_outside_are_validated(tmp_path, bad):
    with pytest.raises(InvalidName, match="job id"):
        validate_job_id(bad)
    with pytest.raises(InvalidName):
        Spool(tmp_path).put_job({"id": bad})


@pytest.mark.parametrize("bad", ["", "..", ".", ".x", "a/b", "a\\b", "x" * 201, "a\x00b", "ü"])
def test_message_names_from_outside_are_validated(tmp_path, bad):
    with pytest.raises(InvalidName, match="message name"):
        validate_message_name(bad)
    with pytest.raises(InvalidName):
        Spool(tmp_path).inbox_path(JOB, bad)


def test_good_names_pass():
    assert validate_message_name("x_owner.round-3.share_1") == "x_owner.round-3.share_1"
    assert validate_seat("model_owner") == "model_owner"
    with pytest.raises(InvalidName, match="seat"):
        validate_seat("../x")


def test_job_lifecycle_markers_and_claim(tmp_path):
    spool = Spool(tmp_path)
    spool.put_job({"id": "a1", "seat": "x_owner"})
    spool.put_job({"id": "b2", "seat": "y_owner"})
    assert spool.put_job({"id": "a1", "seat": "x_owner"}) is False  # unchanged spec is not rewritten
    assert spool.active_job_ids() == ["a1", "b2"]
    spool.claim("a1")
    assert Spool(tmp_path).claimed_jobs() == ["a1"]  # a new process (a restarted runner) sees the claim
    spool.mark_done("a1", "completed")
    spool.release_claim("a1")
    assert spool.claimed_jobs() == []
    spool.mark_ended("b2", "Stopped", "stopped by alice")
    assert spool.ended("b2") == {"status": "Stopped", "message": "stopped by alice"}
    assert spool.active_job_ids() == []


def test_status_queue_keeps_order_across_writers(tmp_path):
    spool = Spool(tmp_path)
    spool.put_status(JOB, {"state": "started", "progress": 0.0})
    spool.put_status(JOB, {"state": "running", "progress": 0.5})
    spool.put_status(JOB, {"state": "completed", "progress": 1.0}, source="uploader")
    items = spool.pending_status()
    assert [i.read()["state"] for i in items] == ["started", "running", "completed"]
    spool.ack_status(items[0])
    assert [i.read()["state"] for i in spool.pending_status()] == ["running", "completed"]


def test_the_status_queue_keeps_its_order_when_the_clock_steps_back(tmp_path, monkeypatch):
    """Updates were named by wall-clock time: a step back (NTP after an outage, a resumed VM) put a later
    "completed" before an earlier "running", and the coordinator showed the seat running again."""
    from services.worker import spool as spool_module

    spool = Spool(tmp_path)
    spool.put_status(JOB, {"state": "running", "progress": 0.5})
    now = spool_module.time.time_ns()
    monkeypatch.setattr(spool_module.time, "time_ns", lambda: now - 3600 * 10**9)  # an hour back
    spool.put_status(JOB, {"state": "completed", "progress": 1.0})
    spool.put_status(JOB, {"state": "completed", "progress": 1.0}, source="uploader")
    assert [(i.read()["state"], i.path.name.split("-")[1]) for i in spool.pending_status()] == [
        ("running", "runner"), ("completed", "runner"), ("completed", "uploader")]


def test_outbox_is_marked_sent_and_remembered(tmp_path):
    spool = Spool(tmp_path)
    path = spool.outbox_path(JOB, "y_owner", "x_owner.r1")
    atomic_write_bytes(path, b"sealed bytes")
    [item] = spool.pending_outbox()
    assert (item.job_id, item.to_seat, item.name) == (JOB, "y_owner", "x_owner.r1")
    spool.mark_sent(item)
    assert spool.pending_outbox() == []
    assert spool.outbox_has(JOB, "y_owner", "x_owner.r1")  # a replaying runner must not re-seal it
    spool.discard_messages(JOB)
    assert not spool.outbox_has(JOB, "y_owner", "x_owner.r1")
    assert os.listdir(tmp_path / "outbox") == []  # nothing of the finished job is left to scan


def one_sealed_message(tmp_path) -> tuple[Spool, OutboxItem]:
    """A spool whose job (x_owner's seat) has one sealed message for y_owner waiting to be sent."""
    spool = Spool(tmp_path)
    atomic_write_bytes(spool.outbox_path(JOB, "y_owner", "x_owner.r1"), b"sealed bytes")
    spool.put_job({"id": JOB, "seat": "x_owner"})
    [item] = spool.pending_outbox()
    return spool, item


def test_a_message_marked_sent_while_the_runner_finishes_its_job_is_no_failure(tmp_path, monkeypatch):
    """The runner ended the job (done, its sent messages removed) between the messenger's check and its rename:
    mark_sent raised FileNotFoundError, logged by the messenger as an unexpected failure with a traceback."""
    import services.worker.spool as spool_module

    spool, item = one_sealed_message(tmp_path)
    real_fsync_dir = spool_module.fsync_dir

    def runner_ends_the_job_meanwhile(folder):
        real_fsync_dir(folder)
        monkeypatch.setattr(spool_module, "fsync_dir", real_fsync_dir)  # once: the runner's end fsyncs too
        spool.mark_done(JOB, "completed")
        spool.discard_messages(JOB)

    monkeypatch.setattr(spool_module, "fsync_dir", runner_ends_the_job_meanwhile)
    spool.mark_sent(item)
    assert os.listdir(tmp_path / "outbox") == []


def test_a_message_marked_sent_just_before_the_runner_finishes_leaves_no_sent_name(tmp_path, monkeypatch):
    """The runner ended the job between the messenger's check and its rename: its discard_messages kept the message,
    still .sealed, and the rename then left a .sent name (and the job's outbox folder) until housekeeping; a test
    that stopped the programs right after found the folder (seen once in CI)."""
    spool, item = one_sealed_message(tmp_path)
    real_done = spool.done

    def done_then_the_runner_ends(job_id):
        answer = real_done(job_id)
        monkeypatch.setattr(spool, "done", real_done)  # once
        spool.mark_done(JOB, "completed")
        spool.discard_messages(JOB)  # finds x_owner.r1 still .sealed: kept for the messenger
        return answer

    monkeypatch.setattr(spool, "done", done_then_the_runner_ends)
    spool.mark_sent(item)
    assert os.listdir(tmp_path / "outbox") == []


def test_a_message_sent_after_the_runner_finished_leaves_nothing_in_the_outbox(tmp_path):
    spool = Spool(tmp_path)
    for name in ("x_owner.r1", "x_owner.r2"):
        atomic_write_bytes(spool.outbox_path(JOB, "y_owner", name), b"sealed bytes")
    spool.put_job({"id": JOB, "seat": "x_owner"})
    spool.mark_done(JOB, "completed")
    spool.discard_messages(JOB)  # the runner's end: both messages still wait for the messenger
    first, second = spool.pending_outbox()
    spool.mark_sent(first)
    assert spool.pending_outbox() == [second] and os.listdir(tmp_path / "outbox" / JOB / "y_owner") == [
        "x_owner.r2.sealed"]
    spool.mark_sent(second)
    assert os.listdir(tmp_path / "outbox") == []


def test_a_folder_another_program_removes_while_it_is_listed_is_an_empty_listing(tmp_path, monkeypatch):
    """A runner ending a job while the messenger emptied and removed the job's outbox logged "cannot record its
    end in the spool (No such file or directory)", wrongly blaming the volume, and took the job up again."""
    import shutil
    from pathlib import Path

    spool = Spool(tmp_path)
    atomic_write_bytes(spool.outbox_path(JOB, "y_owner", "x_owner.r1"), b"sealed bytes")
    spool.put_status(JOB, {"state": "running", "progress": 0.5})
    spool.record_rejection(JOB, "x_owner.r2", "x_owner", "its signature does not verify")
    listed = Path.iterdir

    def removed_as_it_is_listed(self):
        if self.parent.name in ("outbox", "status", "rejected") or self.parent.parent.name == "outbox":
            shutil.rmtree(self, ignore_errors=True)  # the other program's `_remove_empty`, at the worst moment
        return listed(self)

    monkeypatch.setattr(Path, "iterdir", removed_as_it_is_listed)
    spool.discard_messages(JOB)
    assert spool.pending_outbox() == [] and spool.pending_status() == [] and spool.rejections(JOB) == {}


def test_a_job_ended_by_the_coordinator_has_its_unsent_messages_discarded(tmp_path):
    spool = Spool(tmp_path)
    atomic_write_bytes(spool.outbox_path(JOB, "helper", "x_owner.r1"), b"sealed bytes")
    [item] = spool.pending_outbox()
    spool.discard_outbox_item(item)
    assert spool.pending_outbox() == [] and os.listdir(tmp_path / "outbox") == []


def test_an_emptied_status_queue_leaves_no_folder_and_a_writer_makes_it_again(tmp_path):
    spool = Spool(tmp_path)
    spool.put_status(JOB, {"state": "started", "progress": 0.0})
    [item] = spool.pending_status()
    spool.ack_status(item)
    assert os.listdir(tmp_path / "status") == []
    spool.put_status(JOB, {"state": "running", "progress": 0.5})
    assert [i.read()["state"] for i in spool.pending_status()] == ["running"]


def test_a_writer_whose_folder_is_removed_under_it_makes_it_again(tmp_path, monkeypatch):
    # The race `_remove_empty` allows: a consumer removes the empty folder between the writer's mkdir and open.
    target = tmp_path / "status" / JOB / "update.json"
    real_open = os.open
    raced = []

    def racing_open(path, flags, mode=0o777):
        if not raced:
            raced.append(path)
            os.rmdir(target.parent)
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", racing_open)
    atomic_write_bytes(target, b"{}")
    monkeypatch.undo()
    assert raced and target.read_bytes() == b"{}"


def test_a_writer_whose_folder_is_removed_within_its_mkdir_makes_it_again(tmp_path, monkeypatch):
    # mkdir(exist_ok=True) raises FileExistsError when the folder existed at its mkdir but a consumer removed it
    # before its check that a folder is there. A spinning consumer made 13 of 5000 status writes fail that way.
    target = tmp_path / "status" / JOB / "update.json"
    target.parent.parent.mkdir()
    real_mkdir = os.mkdir
    raced = []

    def racing_mkdir(path, mode=0o777):
        if not raced:
            raced.append(path)
            raise FileExistsError(17, "File exists", str(path))  # and it is gone by the time mkdir looks
        return real_mkdir(path, mode)

    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    atomic_write_bytes(target, b"{}")
    monkeypatch.undo()
    assert raced and target.read_bytes() == b"{}"


def test_a_writer_whose_file_is_taken_and_folder_removed_before_its_directory_fsync_succeeds(tmp_path, monkeypatch):
    # The other race: the poller (woken by the spool watch) reports the update, acknowledges it and removes the
    # emptied folder, all between the runner's rename and its fsync of the folder. Unhandled, the runner's status
    # write raised FileNotFoundError, and a runner that fails that way fails its job.
    spool, consumer = Spool(tmp_path), Spool(tmp_path)
    real_replace = os.replace
    reported = []

    def replace_then_consume(src, dst):
        real_replace(src, dst)
        for item in consumer.pending_status():
            reported.append(item.read()["state"])
            consumer.ack_status(item)

    monkeypatch.setattr(os, "replace", replace_then_consume)
    spool.put_status(JOB, {"state": "started", "progress": 0.0})
    monkeypatch.undo()
    assert reported == ["started"]
    assert os.listdir(tmp_path / "status") == []


def test_results_hand_over_to_the_uploader(tmp_path):
    spool = Spool(tmp_path)
    spool.put_result(JOB, {"weights": [1.0, 2.0], "metrics": {"mse_result": 0.1}})
    assert spool.pending_results() == [JOB] and not spool.uploaded(JOB)
    assert spool.read_result(JOB)["weights"] == [1.0, 2.0]
    spool.ack_result(JOB)
    assert spool.pending_results() == [] and spool.uploaded(JOB)
    assert os.listdir(tmp_path / "results") == []  # kept as the job's record, out of the uploader's scan
    assert (tmp_path / "jobs" / JOB / "uploaded.json").exists()


def test_a_result_uploaded_by_an_older_version_still_counts_as_uploaded(tmp_path):
    spool = Spool(tmp_path)
    atomic_write_bytes(tmp_path / "results" / JOB / "uploaded.json", b"{}")
    assert spool.uploaded(JOB) and spool.pending_results() == []


def test_records_of_stored_models_an_older_version_kept_leave_the_uploaders_folder(tmp_path):
    """An older version kept results/<job>/uploaded.json: the uploader listed those folders at every change."""
    spool = Spool(tmp_path)
    kept, pruned, pending = "a" * 32, "b" * 32, "c" * 32
    spool.put_job({"id": kept, "seat": "y_owner"})
    for job in (kept, pruned):
        atomic_write_bytes(tmp_path / "results" / job / "uploaded.json", b'{"stored": 1}')
    spool.put_result(pending, {"weights": [1.0]})
    assert spool.move_old_upload_records() == 2
    assert sorted(os.listdir(tmp_path / "results")) == [pending]  # a result still waiting stays
    assert (tmp_path / "jobs" / kept / "uploaded.json").read_bytes() == b'{"stored": 1}'
    assert spool.uploaded(kept) and not spool.uploaded(pruned) and spool.pending_results() == [pending]
    assert spool.move_old_upload_records() == 0


def test_scans_do_not_read_the_markers_of_finished_jobs_again(tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    for job in ("done1", "ended2", "live3"):
        spool.put_job({"id": job, "seat": "x_owner"})
    spool.mark_done("done1", "completed")
    spool.mark_ended("ended2", "Stopped")
    assert spool.active_job_ids() == ["live3"] and spool.unended_job_ids() == ["done1", "live3"]
    read = []
    import services.worker.spool as spool_module
    real_read = spool_module.read_json
    monkeypatch.setattr(spool_module, "read_json", lambda path: read.append(path.parent.name) or real_read(path))
    assert spool.active_job_ids() == ["live3"]
    assert spool.unended_job_ids() == ["done1", "live3"]
    assert set(read) == {"done1", "live3"}  # done1's ended.json is still read: the coordinator may end it later
    spool.mark_ended("live3", "Completed")  # written by another program: this spool notices on its next scan
    assert spool.active_job_ids() == []


def test_rejections_are_recorded_without_content(tmp_path):
    spool = Spool(tmp_path)
    spool.record_rejection(JOB, "y_owner.r2", "y_owner", "signature does not verify")
    assert spool.rejections(JOB)["y_owner.r2"]["reason"] == "signature does not verify"


def test_rejections_outlive_the_jobs_messages(tmp_path):
    spool = Spool(tmp_path)
    atomic_write_bytes(spool.inbox_path(JOB, "y_owner.r1"), b"plaintext")
    spool.record_rejection(JOB, "y_owner.r2", "y_owner", "signature does not verify")
    spool.discard_messages(JOB)
    assert not spool.inbox_path(JOB, "y_owner.r1").exists()
    assert spool.rejections(JOB)["y_owner.r2"]["reason"] == "signature does not verify"  # the audit trail stays


def test_a_jobs_rejections_are_recorded_up_to_a_bound(tmp_path):
    """A peer or a broker listing junk names cannot fill the spool volume: each is logged, the first are kept."""
    from services.worker.spool import REJECTIONS_KEPT

    spool = Spool(tmp_path)
    kept = [spool.record_rejection(JOB, f"x_owner.junk-{i}", "x_owner", "not a sealed message")
            for i in range(REJECTIONS_KEPT + 20)]
    assert kept == [True] * REJECTIONS_KEPT + [False] * 20
    assert len(spool.rejections(JOB)) == REJECTIONS_KEPT
    assert spool.record_rejection(JOB, "x_owner.junk-0", "x_owner", "again")  # one already kept is updated


def test_only_the_most_recently_finished_jobs_stay_and_nothing_in_use_goes(tmp_path):
    spool = Spool(tmp_path)
    for k in range(5):  # finished, oldest first
        job = f"old{k}"
        spool.put_job({"id": job, "seat": "x_owner"})
        spool.mark_done(job, "completed")
        spool.mark_ended(job, "Completed")
        os.utime(spool.job_dir(job) / "ended.json", ns=(k * 10**9, k * 10**9))
    spool.record_rejection("old0", "y_owner.r1", "y_owner", "signature does not verify")
    for job in ("sending", "claimed", "running"):
        spool.put_job({"id": job, "seat": "x_owner"})
    for job in ("sending", "claimed"):  # done and ended, but still in use: a message to send, a claim
        spool.mark_done(job, "completed")
        spool.mark_ended(job, "Completed")
    atomic_write_bytes(spool.outbox_path("sending", "y_owner", "x_owner.r9"), b"sealed bytes")
    spool.claim("claimed")
    for leftover in (tmp_path / "outbox" / "old1" / "helper", tmp_path / "results" / "old2"):
        leftover.mkdir(parents=True)  # empty folders a crash left: they do not keep a job
    atomic_write_bytes(tmp_path / "outbox" / "old2" / "y_owner" / "x_owner.r1.sent", b"")  # a name sent late

    other = Spool(tmp_path)  # another program's view, which saw the old jobs finish
    assert other.active_job_ids() == ["running"] and "old0" in other._seen_done

    assert sorted(spool.prune_finished(keep=2)) == ["old0", "old1", "old2"]
    assert sorted(spool.job_ids()) == ["claimed", "old3", "old4", "running", "sending"]
    assert spool.rejections("old0") == {} and not (tmp_path / "rejected" / "old0").exists()  # with its record
    assert os.listdir(tmp_path / "outbox") == ["sending"] and os.listdir(tmp_path / "results") == []
    assert other.prune_finished(keep=2) == []  # the other program agrees, and forgets what it remembered of them
    assert other.active_job_ids() == ["running"] and not {"old0", "old1", "old2"} & other._seen_done


def test_a_programs_scratch_files_are_removed_by_prefix_only(tmp_path):
    spool = Spool(tmp_path)
    scratch = spool.temp_file(".csv")
    scratch.parent.mkdir(parents=True, exist_ok=True)
    scratch.write_bytes(b"data")
    other = tmp_path / "tmp" / ".upload-1-2.tmp"
    other.write_bytes(b"model")
    not_temp = tmp_path / "tmp" / ".scratch-notes"  # no .tmp suffix: not ours to remove
    not_temp.write_bytes(b"x")
    assert spool.remove_scratch(".scratch-") == 1
    assert not scratch.exists() and other.exists() and not_temp.exists()
    assert Spool(tmp_path / "fresh").remove_scratch(".scratch-") == 0


def test_a_runner_mark_that_cannot_be_replaced_on_a_full_volume_is_removed_not_kept(tmp_path, monkeypatch):
    """The last runner's mark, from another `cape-worker run`, stayed when a full volume refused this runner's own:
    every later death in this run then read as the whole worker's and was never counted, so a job the OOM killer
    kept killing replayed until its partners gave up. It is removed instead (that needs no room)."""
    import errno
    import json

    from services.worker import spool as spool_module
    from services.worker.spool import RUNNER_RUNNING_NAME

    spool = Spool(tmp_path / "spool")
    mark = tmp_path / "spool" / "claims" / RUNNER_RUNNING_NAME
    monkeypatch.setenv("CAPE_RUN_ID", "earlier-run")
    assert spool.runner_starts(0) is None
    monkeypatch.setenv("CAPE_RUN_ID", "this-run")

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module, "atomic_write_json", full)
    assert spool.runner_starts(0)["run"] == "earlier-run"  # the last runner died: said to the caller
    assert not mark.exists()
    monkeypatch.undo()
    monkeypatch.setenv("CAPE_RUN_ID", "this-run")
    assert spool.runner_starts(0) is None  # the next start of this run finds no stale mark
    assert json.loads(mark.read_text())["run"] == "this-run"
