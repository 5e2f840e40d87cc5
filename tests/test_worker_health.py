"""What `cape-worker status` says of the spool's jobs and of a refused token (pure: files only)."""
from services.worker import health
from services.worker.spool import Spool


def test_every_claimed_job_shows_running_or_queued_for_a_slot(tmp_path):
    """The runner works on several jobs at once: each claimed job holding a slot is running, not only the first by
    id; one taken but waiting for a slot is queued."""
    spool = Spool(tmp_path / "spool")
    for job_id, seat in (("job-a", "x_owner"), ("job-b", "helper"), ("job-c", "y_owner"), ("job-d", "x_owner"),
                         ("job-q", "x_owner")):
        spool.put_job({"id": job_id, "seat": seat, "status": "Approved"})
    spool.claim("job-a", working=True)
    spool.claim("job-b", working=True)
    spool.claim("job-q")
    spool.mark_done("job-d", "completed")
    spool.mark_ended("job-d", "Completed")
    jobs = {job["id"]: job for job in health.spool_jobs(spool)}
    assert {job_id: job["runner"] for job_id, job in jobs.items()} == {
        "job-a": "running", "job-b": "running", "job-c": "waiting", "job-d": "completed", "job-q": "queued"}
    assert (jobs["job-b"]["seat"], jobs["job-d"]["status"]) == ("helper", "Completed")
    assert [job["reason"] for job in jobs.values()] == [None] * 5


def test_claimed_jobs_of_a_stopped_worker_and_reasons(tmp_path):
    """With the runner not running, a claim is only a claim (it resumes at the next start); failed and ended jobs
    say why, as the runner or the coordinator put it."""
    spool = Spool(tmp_path / "spool")
    for job_id in ("job-a", "job-e", "job-s"):
        spool.put_job({"id": job_id, "seat": "x_owner", "status": "Approved"})
    spool.claim("job-a")
    spool.mark_done("job-e", "error", "dataview 'xs': no column 'age'; the file has 'Age'")
    spool.mark_ended("job-s", "Stopped", "stopped by ds@bank.example")
    jobs = {job["id"]: job for job in health.spool_jobs(spool, runner_running=False)}
    assert {job_id: (job["runner"], job["reason"]) for job_id, job in jobs.items()} == {
        "job-a": ("claimed", None),
        "job-e": ("error", "dataview 'xs': no column 'age'; the file has 'Age'"),
        "job-s": ("waiting", "stopped by ds@bank.example"),
    }


def test_a_result_shows_whether_its_upload_succeeded(tmp_path):
    """A failed upload is not shown as uploaded (the job's error says why)."""
    spool = Spool(tmp_path / "spool")
    for job_id in ("job-u", "job-f", "job-p"):
        spool.put_job({"id": job_id, "seat": "y_owner", "status": "Started"})
        spool.put_result(job_id, {"job_id": job_id, "weights": [1.0]})
    spool.ack_result("job-u")
    spool.ack_result("job-f", failed=True)
    jobs = {job["id"]: job["result"] for job in health.spool_jobs(spool)}
    assert jobs == {"job-u": "uploaded", "job-f": "upload failed", "job-p": "pending upload"}
    assert spool.uploaded("job-u") and not spool.uploaded("job-f") and spool.upload_failed("job-f")


def test_login_refused_record(tmp_path):
    assert health.LOGIN_REFUSED.read(tmp_path) is None
    assert health.LOGIN_REFUSED.clear(tmp_path) is False
    health.LOGIN_REFUSED.record(tmp_path, "the coordinator refused CAPE_TOKEN (revoked)")
    record = health.LOGIN_REFUSED.read(tmp_path)
    health.LOGIN_REFUSED.record(tmp_path, "the coordinator refused CAPE_TOKEN (unknown token)")
    assert health.LOGIN_REFUSED.read(tmp_path) == {"since": record["since"],
                                                   "message": "the coordinator refused CAPE_TOKEN (unknown token)"}
    assert health.LOGIN_REFUSED.line({"since": 0.0, "message": "m"}) == \
        "the coordinator refuses this worker (since ?): m"
    assert health.LOGIN_REFUSED.line({"since": 86400.0, "message": "m"}) == \
        "the coordinator refuses this worker (since 1970-01-02 00:00:00 UTC): m"
    (tmp_path / health.LOGIN_REFUSED_NAME).write_text("{not json")
    assert health.LOGIN_REFUSED.read(tmp_path) == {"since": 0.0, "message": "the coordinator refused CAPE_TOKEN"}
    assert health.LOGIN_REFUSED.clear(tmp_path) is True
    assert health.LOGIN_REFUSED.read(tmp_path) is None
