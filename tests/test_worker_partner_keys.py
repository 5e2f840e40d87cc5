"""A partner organization's worker showing other keys than before is said, with both fingerprints (the coordinator
alone hands out the keys: a swap by it would otherwise go unseen)."""
from __future__ import annotations

import json
import logging
import re
import stat

from services.worker.coordinator_client import CoordinatorClient
from services.worker.config import WorkerConfig
from services.worker.keys import WorkerKeys
from services.worker.partner_keys import BOOK_FILE, PartnerKeyBook
from services.worker.poller import Poller
from services.worker.spool import Spool


def party(org_id: str, label: str, keys: WorkerKeys) -> dict:
    return {"organization": {"id": org_id, "label": label}, **keys.public_keys()}


def job(job_id: str, parties: dict[str, dict]) -> dict:
    return {"id": job_id, "seat": "x_owner", "status": "Approved", "outputs_to": "y_owner", "parties": parties}


def test_a_changed_partner_key_is_said_once_with_both_fingerprints(tmp_path):
    own, bank, helper, moved = (WorkerKeys.load_or_create(tmp_path / name) for name in ("own", "bank", "hlp", "new"))
    book = PartnerKeyBook(tmp_path / "state")
    (tmp_path / "state").mkdir(mode=0o700)
    parties = {"x_owner": party("o-own", "own", own), "y_owner": party("o-bank", "bank", bank),
               "helper": party("o-hlp", "helper", helper)}
    assert book.note(job("j1", parties)) == []  # first sight: nothing to compare with
    assert book.note(job("j2", parties)) == []
    assert stat.S_IMODE((tmp_path / "state" / BOOK_FILE).stat().st_mode) == 0o600
    assert set(json.loads((tmp_path / "state" / BOOK_FILE).read_text())) == {"o-bank", "o-hlp"}  # not our own
    assert book.note(job("j2b", {**parties, "y_owner": party("o-own", "own", own)})) == []  # our own other seat
    assert set(json.loads((tmp_path / "state" / BOOK_FILE).read_text())) == {"o-bank", "o-hlp"}
    changes = book.note(job("j3", {**parties, "y_owner": party("o-bank", "bank", moved)}))
    assert [(c.job, c.organization, c.before, c.after, c.last_job) for c in changes] == [
        ("j3", "bank", bank.fingerprint, moved.fingerprint, "j1")]
    assert re.fullmatch(r"job j3: organization bank's worker shows other keys than it did from job j1 \(\d{4}-\d\d-\d\dT"
                        r"\d\d:\d\d:\d\dZ\) on: SHA256:\S{43}, was SHA256:\S{43}\. A worker moved to a new machine or "
                        r"that lost its state dir makes new keys; if that is not why, the coordinator may be handing "
                        r"out keys of its own: ask bank's operator for the fingerprint `cape-worker status` shows "
                        r"there", changes[0].line()), changes[0].line()
    assert book.note(job("j4", {**parties, "y_owner": party("o-bank", "bank", moved)})) == []  # said once
    broken = {**parties, "y_owner": party("o-bank", "bank", moved), "helper": {"organization": {"id": "o-hlp", "label": "helper"},
                                    "encryption_public_key": "not base64!", "signing_public_key": "x"}}
    assert book.note(job("j5", broken)) == []  # the runner refuses such a job; the book keeps what it had
    assert json.loads((tmp_path / "state" / BOOK_FILE).read_text())["o-hlp"]["fingerprint"] == helper.fingerprint


def test_the_poller_logs_a_partners_new_keys_when_it_stores_the_job(tmp_path, caplog):
    config = WorkerConfig.from_env({"CAPE_TOKEN": "tid,c2VjcmV0LXNlY3JldC1zZWNyZXQ=", "CAPE_WORKER_NAME": "w",
                                    "CAPE_COORDINATOR": "http://127.0.0.1:9", "CAPE_SPOOL_DIR": str(tmp_path / "spool"),
                                    "CAPE_STATE_DIR": str(tmp_path / "state")})
    own = WorkerKeys.load_or_create(config.state_dir)
    poller = Poller(config, CoordinatorClient(config.coordinator, config.token, timeout=1), Spool(config.spool_dir),
                    own)
    bank, helper, moved = (WorkerKeys.load_or_create(tmp_path / name) for name in ("bank", "hlp", "new"))
    parties = {"x_owner": party("o-own", "own", own), "y_owner": party("o-bank", "bank", bank),
               "helper": party("o-hlp", "helper", helper)}
    caplog.set_level(logging.INFO, logger="cape.poller")
    assert poller.store_jobs([job("a" * 32, parties)]) == {"a" * 32}
    assert poller.store_jobs([job("a" * 32, parties)]) == {"a" * 32}  # the same job again: nothing to note
    assert "other keys" not in caplog.text
    poller.store_jobs([job("b" * 32, {**parties, "y_owner": party("o-bank", "bank", moved)})])
    said = [r for r in caplog.records if "other keys" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert said[0].getMessage().startswith(f"job {'b' * 32}: organization bank's worker shows other keys than it did "
                                           f"from job {'a' * 32} (")
    assert f"on: {moved.fingerprint}, was {bank.fingerprint}." in said[0].getMessage()


def test_a_malformed_party_is_skipped_not_said_to_ignore_a_job_the_poller_stored(tmp_path, caplog):
    """A party or organization of another shape than an object raised AttributeError out of the book after the
    poller had stored the job: it logged "ignoring a job from the coordinator with an invalid id or shape" for a
    job it had stored and ran, and left it out of those served."""
    config = WorkerConfig.from_env({"CAPE_TOKEN": "tid,c2VjcmV0LXNlY3JldC1zZWNyZXQ=", "CAPE_WORKER_NAME": "w",
                                    "CAPE_COORDINATOR": "http://127.0.0.1:9", "CAPE_SPOOL_DIR": str(tmp_path / "spool"),
                                    "CAPE_STATE_DIR": str(tmp_path / "state")})
    own = WorkerKeys.load_or_create(config.state_dir)
    spool = Spool(config.spool_dir)
    poller = Poller(config, CoordinatorClient(config.coordinator, config.token, timeout=1), spool, own)
    bank = WorkerKeys.load_or_create(tmp_path / "bank")
    caplog.set_level(logging.INFO, logger="cape.poller")
    for n, odd in enumerate(("helper", {"organization": "o-hlp"}, {"organization": {"id": ["o-hlp"]}})):
        job_id = str(n) * 32
        parties = {"x_owner": party("o-own", "own", own), "y_owner": party("o-bank", "bank", bank), "helper": odd}
        assert poller.store_jobs([job(job_id, parties)]) == {job_id}, caplog.text
        assert spool.read_job(job_id) is not None
    assert "ignoring" not in caplog.text
    assert set(json.loads((tmp_path / "state" / BOOK_FILE).read_text())) == {"o-bank"}
