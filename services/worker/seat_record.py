"""A job this worker's spool has no record of, although the coordinator shows its seat taken.

The runner claims a job in the spool before its seat reports anything, so a seat the coordinator shows `started`,
`running`, `completed` or `error` for a job the spool never claimed was taken by a runner whose spool is gone:
CAPE_SPOOL_DIR emptied or replaced while the job ran (a container re-created without its spool volume, Docker's
anonymous VOLUME, a Kubernetes emptyDir), or another worker running with a copy of this CAPE_STATE_DIR. The
messages that spool had received are acknowledged at the broker, gone: a replay waits for them until its partners
give up, and the job's error then named this worker's partner, or this worker, as not sending.
"""
from __future__ import annotations

from services.worker.spool import Spool

SEAT_TAKEN = ("started", "running")
SEAT_ENDED = ("completed", "error")

ENDED_MESSAGE = ("its seat had already ended at the coordinator ({state}) when this worker's spool first saw the "
                 "job (CAPE_SPOOL_DIR emptied or replaced while the job ran?); not run again")
LOST_NOTE = ("started again without its spool's record of the job (CAPE_SPOOL_DIR emptied or replaced while the "
             "job ran?): the messages it had received are lost, so the job may end in Error")
LOST_ERROR = ("this worker had started the job again without its spool's record of it: CAPE_SPOOL_DIR emptied or "
              "replaced while the job ran? The messages it had received are lost; its operator keeps CAPE_SPOOL_DIR "
              "on a persistent volume, then the job is submitted again")
LOST_LOG = ("job %s: the coordinator shows this seat %s, but this worker's spool holds no record of the job: "
            "CAPE_SPOOL_DIR was emptied or replaced while the job ran (a container re-created without its spool "
            "volume?), or another worker runs with a copy of this CAPE_STATE_DIR. The messages received before are "
            "lost, so the job may end in Error at its timeout; keep CAPE_SPOOL_DIR on a persistent volume, and "
            "submit the job again if it does")


def seat_taken_before(spool: Spool, job_id: str) -> str | None:
    """The seat's state at the coordinator when this spool never claimed nor finished `job_id` and yet the seat
    was taken (one of SEAT_TAKEN or SEAT_ENDED); None for a job this spool knows, or whose seat is still free."""
    if spool.is_claimed(job_id) or spool.done(job_id) is not None:
        return None
    state = (spool.read_job(job_id) or {}).get("seat_state")
    return state if state in SEAT_TAKEN + SEAT_ENDED else None
