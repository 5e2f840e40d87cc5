"""An organization's members see their worker's last heartbeat and its programs' states; nobody else does."""
from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

from services.client.commands.orgs import worker_line
from tests.support.server import Api, worker_public_keys


def test_members_see_their_workers_heartbeat_and_programs(cape_server):
    acme = cape_server.create_org("acme")
    other = cape_server.create_org("other")
    admin, worker = Api(cape_server, acme["user_token"]), Api(cape_server, acme["organization_token"])

    before = admin.get("/v1/organizations/acme/worker")
    assert before.status_code == 200
    assert before.json() == {"registered": False, "keys_updated_at": None, "last_seen": None,
                             "seconds_since_seen": None, "online": False, "stopped_at": None, "version": None,
                             "programs": None}

    assert worker.put("/v1/worker/keys", json=worker_public_keys()).status_code == 204
    programs = {"poller": "RUNNING", "messenger": "RUNNING", "runner": "BACKOFF", "uploader": "RUNNING"}
    assert worker.post("/v1/worker/heartbeat", json={"version": "0.1.0", "programs": programs}).status_code == 204

    seen = admin.get("/v1/organizations/acme/worker").json()
    assert seen["registered"] is True and seen["version"] == "0.1.0" and seen["programs"] == programs
    assert seen["last_seen"] and seen["keys_updated_at"]
    assert seen["online"] is True and 0 <= seen["seconds_since_seen"] < 5

    refused = Api(cape_server, other["user_token"]).get("/v1/organizations/acme/worker")
    assert refused.status_code == 403 and refused.json()["error"]["message"]


def test_a_worker_that_says_it_stops_is_offline_at_once_until_it_beats_again(cape_server):
    """A stopped worker looked online for 45 s, hiding why the jobs waiting for it did not start."""
    acme = cape_server.create_org("acme")
    admin, worker = Api(cape_server, acme["user_token"]), Api(cape_server, acme["organization_token"])
    keys = worker_public_keys()
    assert worker.put("/v1/worker/keys", json=keys).status_code == 204
    assert worker.post("/v1/worker/heartbeat", json={"version": "0.1.0"}).status_code == 204
    assert admin.get("/v1/organizations/acme/worker").json()["online"] is True
    said = worker.post("/v1/worker/heartbeat", json={"version": "0.1.0", "signing_public_key":
                                                     keys["signing_public_key"], "stopping": True})
    assert said.status_code == 204
    stopped = admin.get("/v1/organizations/acme/worker").json()
    assert stopped["online"] is False and stopped["stopped_at"] and stopped["seconds_since_seen"] < 5
    assert worker_line(stopped) == f"worker: keys registered; STOPPED at {stopped['stopped_at']} (it said so as it stopped)"
    # Its keys no longer hold the seat against a worker started elsewhere (a move to a new machine).
    assert worker.put("/v1/worker/keys", json=worker_public_keys()).status_code == 204
    assert worker.post("/v1/worker/heartbeat", json={"version": "0.1.0"}).status_code == 204
    back = admin.get("/v1/organizations/acme/worker").json()
    assert back["online"] is True and back["stopped_at"] is None


def test_a_worker_silent_for_over_45_seconds_is_offline(cape_server):
    acme = cape_server.create_org("acme")
    admin, worker = Api(cape_server, acme["user_token"]), Api(cape_server, acme["organization_token"])
    assert worker.post("/v1/worker/heartbeat", json={"version": "0.1.0"}).status_code == 204

    def heard(seconds_ago: float) -> dict:
        """The status once the last heartbeat is moved `seconds_ago` into the past (the server's clock is ours)."""
        when = (datetime.now(UTC) - timedelta(seconds=seconds_ago)).isoformat(timespec="milliseconds")
        with sqlite3.connect(cape_server.data_dir / "coordinator.sqlite3", timeout=10) as conn:
            conn.execute("UPDATE workers SET last_seen = ?", (when.replace("+00:00", "Z"),))
        conn.close()
        return admin.get("/v1/organizations/acme/worker").json()

    late = heard(40)
    assert late["online"] is True and 40 <= late["seconds_since_seen"] < 44
    gone = heard(600)
    assert gone["online"] is False and 600 <= gone["seconds_since_seen"] < 604
    assert gone["registered"] is False and gone["version"] == "0.1.0"
    assert worker_line(gone) == (f"worker: no keys registered; last heartbeat {gone['last_seen']} "
                                 f"({gone['seconds_since_seen']:.0f} s ago): OFFLINE (it heartbeats every 15 s)")
    assert worker_line({**late, "programs": {"poller": "RUNNING"}}) == (
        f"worker: no keys registered; last heartbeat {late['last_seen']} ({late['seconds_since_seen']:.0f} s ago); "
        "poller RUNNING")
    assert worker_line({"registered": False, "last_seen": None}) == "worker: no keys registered; never heard from"


def test_a_heartbeat_from_before_the_servers_clock_was_set_back_is_no_proof_of_life(cape_server):
    """The server's clock set back an hour (NTP, a resumed VM) after a worker's last heartbeat: that heartbeat
    looked "0 s ago", so a worker gone since showed online, and held its seat against a replacement, for an hour."""
    acme = cape_server.create_org("acme")
    admin, worker = Api(cape_server, acme["user_token"]), Api(cape_server, acme["organization_token"])
    first, second = worker_public_keys(), worker_public_keys()
    assert worker.put("/v1/worker/keys", json=first).status_code == 204
    assert worker.post("/v1/worker/heartbeat", json={"version": "0.1.0"}).status_code == 204
    ahead = (datetime.now(UTC) + timedelta(hours=1)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    with sqlite3.connect(cape_server.data_dir / "coordinator.sqlite3", timeout=10) as conn:
        conn.execute("UPDATE workers SET last_seen = ?", (ahead,))
    conn.close()

    stale = admin.get("/v1/organizations/acme/worker").json()
    assert stale["online"] is False and stale["seconds_since_seen"] is None and stale["last_seen"] == ahead
    assert worker_line(stale) == f"worker: keys registered; last heartbeat {ahead}: OFFLINE (it heartbeats every 15 s)"
    assert worker.put("/v1/worker/keys", json=second).status_code == 204  # its replacement takes the seat
    assert worker.post("/v1/worker/heartbeat", json={"signing_public_key": second["signing_public_key"]}
                       ).status_code == 204
    again = admin.get("/v1/organizations/acme/worker").json()
    assert again["online"] is True and 0 <= again["seconds_since_seen"] < 5


def test_cape_orgs_show_tells_whether_the_worker_is_alive(cape_server, cape_home):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    acme = cape_server.create_org("acme")
    worker = Api(cape_server, acme["organization_token"])
    assert worker.put("/v1/worker/keys", json=worker_public_keys()).status_code == 204
    assert worker.post("/v1/worker/heartbeat", json={"programs": {"poller": "RUNNING"}}).status_code == 204
    env = {**os.environ, "CAPE_COORDINATOR": cape_server.url, "CAPE_TOKEN": acme["user_token"]}
    cape = str(Path(sys.executable).parent / "cape")
    shown = subprocess.run([cape, "orgs", "show", "acme"], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "worker: keys registered; last heartbeat " in shown.stdout and "; poller RUNNING" in shown.stdout
    as_json = subprocess.run([cape, "orgs", "show", "acme", "--json"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert json.loads(as_json.stdout)["worker"]["programs"] == {"poller": "RUNNING"}


def test_other_keys_do_not_replace_a_live_workers_keys(cape_server):
    """One organization, one worker: keys are replaced only once the registered worker has been silent 45 s; a
    heartbeat naming other keys than the registered ones is refused and not counted as the worker being alive."""
    worker = Api(cape_server, cape_server.create_org("duo")["organization_token"])
    first, second = worker_public_keys(), worker_public_keys()
    assert worker.put("/v1/worker/keys", json=first).status_code == 204
    assert worker.put("/v1/worker/keys", json=second).status_code == 204  # never heard from: a new machine, say
    assert worker.post("/v1/worker/heartbeat", json={"signing_public_key": second["signing_public_key"]}
                       ).status_code == 204
    assert worker.put("/v1/worker/keys", json=second).status_code == 204  # the same keys again: a restart
    taken = worker.put("/v1/worker/keys", json=first)
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "worker_keys_in_use"
    stale = worker.post("/v1/worker/heartbeat", json={"signing_public_key": first["signing_public_key"]})
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "other_worker_keys"
    assert stale.json()["error"]["message"].startswith("another worker of this organization registered other keys at ")

    db = sqlite3.connect(cape_server.data_dir / "coordinator.sqlite3")
    last_seen = (datetime.now(UTC) - timedelta(seconds=60)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    db.execute("UPDATE workers SET last_seen = ?", (last_seen,))
    db.commit()
    db.close()
    assert worker.put("/v1/worker/keys", json=first).status_code == 204  # silent for 60 s: the seat is free
