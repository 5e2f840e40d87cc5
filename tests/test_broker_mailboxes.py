"""Broker mailboxes against a real cape-server: idempotent puts, long-poll, download, acknowledge, expiry, access."""
from __future__ import annotations

import shutil
import sqlite3
import threading
import time

import pytest
import requests

from services.worker.broker_client import BrokerClient
from tests.support.server import Api, build_job_world


def _messages(jid: str, name: str = "", seat: str = "") -> str:
    path = f"/broker/v1/jobs/{jid}/messages"
    return f"{path}/{seat}/{name}" if seat else (f"{path}/{name}" if name else path)


def test_put_list_get_ack_and_idempotent_puts(cape_server):
    world = build_job_world(cape_server)
    jid, worker = world["job"]["id"], world["worker"]
    body = b"\x00ciphertext\xff" * 1000
    put = worker["xorg"].put(_messages(jid, "x_owner.r1.x-to-y", "y_owner"), data=body)
    assert put.status_code == 201, put.text
    assert worker["xorg"].put(_messages(jid, "x_owner.r1.x-to-y", "y_owner"), data=body).status_code == 200
    for other_bytes in (b"other bytes", body[:-1] + b"\x00"):  # other size; same size, last byte differs
        other = worker["xorg"].put(_messages(jid, "x_owner.r1.x-to-y", "y_owner"), data=other_bytes)
        assert other.status_code == 409 and other.json()["error"]["code"] == "message_conflict"

    listed = worker["yorg"].get(_messages(jid)).json()
    assert [(m["name"], m["from_seat"], m["size"]) for m in listed] == [("x_owner.r1.x-to-y", "x_owner", len(body))]
    assert set(listed[0]) == {"name", "from_seat", "size", "created_at"}
    assert worker["helper"].get(_messages(jid)).json() == []  # mailboxes are per seat
    assert worker["helper"].get(_messages(jid, "x_owner.r1.x-to-y")).status_code == 404

    got = worker["yorg"].get(_messages(jid, "x_owner.r1.x-to-y"))
    assert got.status_code == 200 and got.content == body
    assert got.headers["content-type"] == "application/octet-stream"
    assert worker["yorg"].delete(_messages(jid, "x_owner.r1.x-to-y")).status_code == 204
    assert worker["yorg"].delete(_messages(jid, "x_owner.r1.x-to-y")).status_code == 404
    assert worker["yorg"].get(_messages(jid)).json() == []


def test_long_poll_returns_within_100_ms_of_a_put(cape_server):
    world = build_job_world(cape_server)
    jid, worker = world["job"]["id"], world["worker"]
    returned: dict[str, object] = {}

    def poll() -> None:
        response = worker["helper"].get(_messages(jid), params={"wait": 20})
        returned["at"] = time.monotonic()
        returned["messages"] = response.json()

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)  # the poll is parked on the server by now
    assert "at" not in returned
    put = worker["yorg"].put(_messages(jid, "y_owner.share-0", "helper"), data=b"abc")
    put_done = time.monotonic()
    assert put.status_code == 201
    poller.join(timeout=20)
    assert [m["name"] for m in returned["messages"]] == ["y_owner.share-0"]
    latency = returned["at"] - put_done
    assert latency < 0.1, f"long-poll returned {latency:.3f} s after the put"
    print(f"long-poll returned {latency * 1000:.1f} ms after the put's answer")


def test_long_poll_times_out_empty(cape_server):
    world = build_job_world(cape_server)
    started = time.monotonic()
    response = world["worker"]["xorg"].get(_messages(world["job"]["id"]), params={"wait": 0.5})
    assert response.json() == [] and 0.45 <= time.monotonic() - started < 5
    too_long = world["worker"]["xorg"].get(_messages(world["job"]["id"]), params={"wait": 61})
    assert too_long.status_code == 422 and "wait" in too_long.json()["error"]["message"]


def test_access_is_limited_to_the_job_parties(cape_server):
    world = build_job_world(cape_server)
    jid = world["job"]["id"]
    outsider = cape_server.create_org("outsider")
    path = _messages(jid, "m1", "y_owner")
    assert Api(cape_server, None).put(path, data=b"x").status_code == 401
    assert Api(cape_server, None).get(_messages(jid)).status_code == 401
    assert Api(cape_server, "nope,nope").put(path, data=b"x").status_code == 401
    # The outsider is a worker of another job (job 2, same project), not of job 1.
    out_user, out_worker = Api(cape_server, outsider["user_token"]), Api(cape_server, outsider["organization_token"])
    assert world["user"]["xorg"].post("/v1/projects/demo/organizations", json={"organization": "outsider"}).ok
    assert out_user.post("/v1/projects/demo/dataviews", json={
        "name": "ox", "uri": "file:///o.csv", "schema": [{"name": "a", "type": "number"}]}).ok
    job2 = out_user.post("/v1/projects/demo/jobs", json={
        "type": "linear_regression", "x": {"dataview": "ox", "columns": ["a"]}, "y": {"dataview": "ys", "column": "t"},
        "model_owner": "yorg"}).json()["id"]
    assert out_user.post(f"/v1/jobs/{job2}/approve").ok and world["user"]["yorg"].post(f"/v1/jobs/{job2}/approve").ok
    assert out_worker.put(_messages(job2, "x_owner.m1", "y_owner"), data=b"x").status_code == 201
    refused = out_worker.put(path, data=b"x")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "no_seat"
    assert out_worker.get(_messages(jid)).status_code == 403
    assert out_worker.get(_messages(jid, "m1")).status_code == 403
    assert out_worker.delete(_messages(jid, "m1")).status_code == 403
    # A person's token is not a worker's token, even for a member of a party organization.
    assert world["user"]["xorg"].put(path, data=b"x").status_code == 403
    assert world["worker"]["xorg"].get(_messages("0" * 32)).status_code == 404
    bad_name = world["worker"]["xorg"].put(_messages(jid, "a%2Fb", "y_owner"), data=b"x")
    assert bad_name.status_code in (404, 422)
    bad_seat = world["worker"]["xorg"].put(_messages(jid, "m1", "boss"), data=b"x")
    assert bad_seat.status_code == 422
    assert bad_seat.json()["error"]["message"] == "field 'to_seat': this job's seats are x_owner, y_owner, helper"
    # This job has a helper seat, not a model_owner one: nobody would ever read that mailbox.
    assert world["worker"]["xorg"].put(_messages(jid, "m1", "model_owner"), data=b"x").status_code == 422
    # Nor its own mailbox: no partner would take (acknowledge) what waits there, and it would count against the job.
    own = world["worker"]["xorg"].put(_messages(jid, "x_owner.m1", "x_owner"), data=b"x")
    assert (own.status_code, own.json()["error"]["message"]) == (
        422, "field 'to_seat': x_owner is the sender's own seat; a message goes to another seat of the job")


def test_a_seat_cannot_take_another_seats_message_name(cape_server):
    """Names are written once: the helper putting `x_owner.<name>` first would hold the x-owner's message back."""
    world = build_job_world(cape_server)
    jid = world["job"]["id"]
    squat = world["worker"]["helper"].put(_messages(jid, "x_owner.lr-x-rows", "y_owner"), data=b"x")
    assert squat.status_code == 422
    assert squat.json()["error"]["message"] == (
        "field 'name': a message from seat helper is named helper.<name> (receivers check the sender by it)")
    assert world["worker"]["xorg"].put(_messages(jid, "x_owner.lr-x-rows", "y_owner"), data=b"x").status_code == 201


def test_size_limit(start_cape_server):
    server = start_cape_server(extra_args=["--max-message-bytes", "1000"])
    world = build_job_world(server)
    api, jid = world["worker"]["xorg"], world["job"]["id"]
    assert api.put(_messages(jid, "x_owner.ok", "y_owner"), data=b"a" * 1000).status_code == 201
    declared = api.put(_messages(jid, "x_owner.big", "y_owner"), data=b"a" * 1001)
    assert declared.status_code == 413 and "1000" in declared.json()["error"]["message"]
    streamed = api.put(_messages(jid, "x_owner.big", "y_owner"), data=iter([b"a" * 600, b"b" * 600]))  # chunked
    assert streamed.status_code == 413
    assert [m["name"] for m in world["worker"]["yorg"].get(_messages(jid)).json()] == ["x_owner.ok"]
    assert list((server.data_dir / "broker" / "incoming").iterdir()) == []


def test_a_body_from_which_nothing_arrives_is_given_up_with_its_partial_file(start_cape_server):
    """A sender whose network dropped the flow (a NAT, a pulled cable) never closes it: its partial body stayed in
    incoming/ until a restart. After --body-idle-seconds without a byte it is dropped and answered 408."""
    import re
    import socket

    server = start_cape_server(extra_args=["--body-idle-seconds", "1"])
    world = build_job_world(server)
    host, port = re.match(r"http://([^:]+):(\d+)", server.url).groups()
    incoming = server.data_dir / "broker" / "incoming"
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(f"PUT {_messages(world['job']['id'], 'x_owner.r1', 'y_owner')} HTTP/1.1\r\nHost: {host}\r\n"
                     f"Authorization: Bearer {world['orgs']['xorg']['organization_token']}\r\n"
                     "Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n".encode()
                     + b"\0" * 100_000)
        deadline = time.monotonic() + 5
        while not list(incoming.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(incoming.iterdir()), "the partial body was not being written"
        started = time.monotonic()
        answer = conn.recv(65536).decode()  # then silence: nothing more is sent
        waited = time.monotonic() - started
        while "\r\n\r\n" in answer and len(answer.split("\r\n\r\n", 1)[1]) < int(
                re.search(r"content-length: (\d+)", answer, re.IGNORECASE).group(1)):
            more = conn.recv(65536).decode()  # the body may come in a segment of its own (socket timeout: 10 s)
            if not more:
                break
            answer += more
    assert answer.startswith("HTTP/1.1 408"), answer
    assert '"code":"body_timeout"' in answer.replace(" ", "") and "send it again" in answer
    assert 0.5 < waited < 5
    assert list(incoming.iterdir()) == []
    assert world["worker"]["yorg"].get(_messages(world["job"]["id"])).json() == []
    assert "gave up message x_owner.r1 of job" in server.log_path.read_text()


def test_messages_expire_after_ttl(start_cape_server):
    server = start_cape_server(extra_args=["--message-ttl", "1"])
    world = build_job_world(server)
    jid = world["job"]["id"]
    assert world["worker"]["xorg"].put(_messages(jid, "x_owner.old", "y_owner"), data=b"bytes").status_code == 201
    assert len(world["worker"]["yorg"].get(_messages(jid)).json()) == 1
    bodies = server.data_dir / "broker" / "bodies"
    deadline = time.monotonic() + 10
    while any(bodies.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(bodies.iterdir()) == []
    assert world["worker"]["yorg"].get(_messages(jid)).json() == []
    assert world["worker"]["yorg"].get(_messages(jid, "x_owner.old")).status_code == 404


def test_an_ended_jobs_messages_are_dropped_and_a_running_jobs_stay(start_cape_server):
    server = start_cape_server(extra_args=["--job-sweep-seconds", "0.2"])
    world = build_job_world(server)
    ending = world["job"]["id"]
    user = world["user"]
    running = user["yorg"].post("/v1/projects/demo/jobs", json={
        "type": "linear_regression", "x": {"dataview": "xs", "columns": ["a", "b"]},
        "y": {"dataview": "ys", "column": "t"}, "model_owner": "yorg", "model_location": "s3://bucket/models"}
    ).json()["id"]
    for label in ("xorg", "yorg"):
        assert user[label].post(f"/v1/jobs/{running}/approve").status_code == 200
    xorg = world["worker"]["xorg"]
    for jid in (ending, running):
        for name in ("x_owner.r1.a", "x_owner.r1.b"):
            assert xorg.put(_messages(jid, name, "y_owner"), data=b"sealed bytes").status_code == 201
    bodies = server.data_dir / "broker" / "bodies"
    assert len(list(bodies.iterdir())) == 4

    assert user["xorg"].post(f"/v1/jobs/{ending}/stop").status_code == 200
    deadline = time.monotonic() + 10
    while len(list(bodies.iterdir())) > 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(bodies.iterdir())) == 2
    assert world["worker"]["yorg"].get(_messages(ending)).json() == []
    assert [m["name"] for m in world["worker"]["yorg"].get(_messages(running)).json()] == ["x_owner.r1.a", "x_owner.r1.b"]
    assert f"job {ending} ended: dropped 2 message(s) still at the broker" in server.log_path.read_text()

    # A put to the ended job after the sweep (a late retry) is dropped by the next one.
    assert xorg.put(_messages(ending, "x_owner.r2.late", "y_owner"), data=b"late").status_code == 201
    deadline = time.monotonic() + 10
    while len(list(bodies.iterdir())) > 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(bodies.iterdir())) == 2


def test_no_messages_for_a_job_not_yet_approved(start_cape_server):
    """Seats exist from submission, and a job may wait for approval for ever: a worker cannot park bytes at the
    broker for it (they would stay until the TTL). The broker alone learns the status from the coordinator."""
    coordinator = start_cape_server(extra_args=["--only", "coordinator"], name="coordinator")
    broker = start_cape_server(extra_args=["--only", "broker", "--coordinator-url", coordinator.url], name="broker")
    world = build_job_world(coordinator, approve=False)
    jid = world["job"]["id"]
    refused = Api(broker, world["orgs"]["helper"]["organization_token"]).put(_messages(jid, "junk", "x_owner"),
                                                                             data=b"x" * 1000)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == {
        "code": "job_not_approved", "status": "NeedsApproval",
        "message": f"job {jid} is NeedsApproval: the broker takes its messages only once every data owner approved it"}


def test_messages_wait_for_approval_in_one_server(cape_server):
    """The same in one server; once both data owners approved, puts are taken."""
    world = build_job_world(cape_server, approve=False)
    jid, helper = world["job"]["id"], world["worker"]["helper"]
    assert helper.put(_messages(jid, "junk", "x_owner"), data=b"x").status_code == 409
    assert helper.get(_messages(jid)).json() == []
    for org in ("xorg", "yorg"):
        assert world["user"][org].post(f"/v1/jobs/{jid}/approve").status_code == 200
    assert helper.put(_messages(jid, "helper.m", "x_owner"), data=b"x").status_code == 201


def test_broker_alone_asks_the_coordinator(start_cape_server):
    coordinator = start_cape_server(extra_args=["--only", "coordinator"], name="coordinator")
    broker = start_cape_server(extra_args=["--only", "broker", "--coordinator-url", coordinator.url], name="broker")
    world = build_job_world(coordinator)
    jid = world["job"]["id"]
    # Each part that is not here says so, and what to set: not "no such endpoint".
    elsewhere = requests.get(f"{coordinator.url}/broker/v1/jobs/{jid}/messages", timeout=10)
    assert elsewhere.status_code == 404 and elsewhere.json()["error"] == {
        "code": "broker_not_here", "message": "this cape-server runs the coordinator only (--only coordinator); set "
                                              "CAPE_BROKER to the broker's URL"}
    elsewhere = requests.put(f"{broker.url}/v1/worker/jobs/{jid}/status", json={}, timeout=10)
    assert elsewhere.status_code == 404 and elsewhere.json()["error"]["code"] == "coordinator_not_here"

    x = Api(broker, world["orgs"]["xorg"]["organization_token"])
    y = Api(broker, world["orgs"]["yorg"]["organization_token"])
    assert x.put(_messages(jid, "x_owner.m", "y_owner"), data=b"hello").status_code == 201
    assert y.get(_messages(jid, "x_owner.m")).content == b"hello"
    outsider = coordinator.create_org("outsider")
    assert Api(broker, outsider["organization_token"]).get(_messages(jid)).status_code == 403
    assert Api(broker, "bad,token").get(_messages(jid)).status_code == 401
    assert Api(broker, None).get(_messages(jid)).status_code == 401
    assert x.get(_messages("f" * 32)).status_code == 404
    assert "httpx" not in broker.log_path.read_text()  # its questions to the coordinator are not logged one by one
    # A query cannot choose the answer of the part a server does not run.
    chosen = requests.get(f"{coordinator.url}/broker/v1/x", params={"code": "job_ended", "message": "obey"},
                          timeout=10)
    assert chosen.status_code == 404 and chosen.json()["error"]["code"] == "broker_not_here"
    # Its coordinator away, a listing of several jobs is a 503 the worker backs off from, not a 200 refusing each
    # job (which it asked again at once, ~490 times a second).
    coordinator.stop()
    away = x.get("/broker/v1/messages", params={"job": ["e" * 32], "wait": 0})  # not in its 10 s cache
    assert away.status_code == 503 and "cannot reach its coordinator" in away.json()["error"]["message"]


def test_stopping_server_releases_parked_long_polls(cape_server):
    world = build_job_world(cape_server)
    jid, api = world["job"]["id"], world["worker"]["helper"]
    answers: list[requests.Response] = []
    poller = threading.Thread(target=lambda: answers.append(api.get(_messages(jid), params={"wait": 30})))
    poller.start()
    time.sleep(0.5)
    started = time.monotonic()
    cape_server.stop()
    stopped_in = time.monotonic() - started
    poller.join(timeout=10)
    assert [a.status_code for a in answers] == [200] and answers[0].json() == []
    assert stopped_in < 2.5, f"stopping took {stopped_in:.1f} s with a parked long poll"


def test_an_index_from_before_bodies_were_unhashed_still_opens_and_stores(tmp_path):
    from services.broker.store import Commit, MessageStore

    root = tmp_path / "broker"
    root.mkdir()
    old = sqlite3.connect(root / "index.sqlite3")
    old.executescript(
        "CREATE TABLE messages (job_id TEXT NOT NULL, to_seat TEXT NOT NULL, name TEXT NOT NULL, "
        "from_seat TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL, file TEXT NOT NULL, "
        "created REAL NOT NULL, PRIMARY KEY (job_id, to_seat, name));")
    old.close()
    store = MessageStore(tmp_path, ttl_seconds=60)
    try:
        for body, expected in ((b"sealed", Commit.CREATED), (b"sealed", Commit.DUPLICATE), (b"other", Commit.CONFLICT)):
            pending = store.begin(limit=100)
            pending.write(body)
            pending.finish()
            assert store.commit("job", "y_owner", "m", "x_owner", pending) is expected
        [message] = store.waiting("job", "y_owner")
        assert message.file.read_bytes() == b"sealed" and message.size == 6
        assert list(store.incoming.iterdir()) == []  # the duplicate and the conflicting body were discarded
        assert store.sent_by_org("") == (0, 0)  # stored without an organization: counted against none
        pending = store.begin(limit=100)
        pending.write(b"more")
        pending.finish()
        assert store.commit("job", "y_owner", "n", "x_owner", pending, from_org="org-x") is Commit.CREATED
        assert store.sent_by_org("org-x") == (1, 4)
    finally:
        store.close()


def test_a_seat_has_bounded_bytes_waiting_and_sends_again_once_they_are_taken(start_cape_server, tmp_path):
    """One job's sender cannot fill the broker's disk: past --max-job-bytes waiting unacknowledged, a put is 507
    (declared length checked up front, a chunked body at commit), and goes through once the recipient took some.
    A worker's broker client retries a 507 with backoff, so it waits for the room."""
    server = start_cape_server(extra_args=["--max-job-bytes", "1000", "--max-message-bytes", "1000"])
    world = build_job_world(server)
    jid, xorg, yorg = world["job"]["id"], world["worker"]["xorg"], world["worker"]["yorg"]
    assert xorg.put(_messages(jid, "x_owner.a", "y_owner"), data=b"a" * 600).status_code == 201
    full = xorg.put(_messages(jid, "x_owner.b", "y_owner"), data=b"b" * 600)
    assert full.status_code == 507 and full.json()["error"] == {
        "code": "job_quota_exceeded", "message": "seat x_owner has 5.59e-07 GiB waiting for its recipients in this "
        "job and this broker holds at most 9.31e-07 GiB per seat and job; send again once they took some"}
    chunked = xorg.put(_messages(jid, "x_owner.c", "y_owner"), data=iter([b"c" * 300, b"c" * 300]))
    assert chunked.status_code == 507 and chunked.json()["error"]["code"] == "job_quota_exceeded"
    assert list((server.data_dir / "broker" / "incoming").iterdir()) == []  # refused bodies leave nothing
    assert world["worker"]["helper"].put(_messages(jid, "helper.h", "y_owner"), data=b"h" * 600).status_code == 201
    assert xorg.put(_messages(jid, "x_owner.a", "y_owner"), data=b"a" * 600).status_code == 200  # a repeat is fine

    (tmp_path / "b.sealed").write_bytes(b"b" * 600)
    client = BrokerClient(f"{server.url}/broker", world["orgs"]["xorg"]["organization_token"], attempts=30,
                          backoff_base=0.05, backoff_cap=0.2)
    threading.Timer(0.5, lambda: yorg.delete(_messages(jid, "x_owner.a"))).start()
    started = time.monotonic()
    assert client.put(jid, "y_owner", "x_owner.b", tmp_path / "b.sealed") is True
    assert 0.4 < time.monotonic() - started < 10
    assert [m["name"] for m in yorg.get(_messages(jid)).json()] == ["helper.h", "x_owner.b"]


@pytest.mark.parametrize("alone", [False, True], ids=["one server", "broker alone"])
def test_an_organization_has_bounded_bytes_waiting_across_its_jobs(start_cape_server, alone):
    """A member with seats in many jobs could hold --max-job-bytes in each, until the broker's disk refused every
    other project's messages: across its jobs it holds --max-org-bytes at most (both at the put's start and at
    commit), while other organizations' messages go through. A broker alone learns the organization from the
    coordinator."""
    from tests.support.server import SIMPLE_JOB, ok

    limits = ["--max-job-bytes", "1000", "--max-message-bytes", "1000", "--max-org-bytes", "1500",
              "--max-org-messages", "3"]
    if alone:
        coordinator = start_cape_server(extra_args=["--only", "coordinator"], name="coordinator")
        broker = start_cape_server(extra_args=[*limits, "--only", "broker", "--coordinator-url", coordinator.url],
                                   name="broker")
    else:
        coordinator = broker = start_cape_server(extra_args=limits)
    world = build_job_world(coordinator)
    first = world["job"]["id"]
    second = ok(world["user"]["yorg"].post("/v1/projects/demo/jobs", json=SIMPLE_JOB))["id"]
    for org in ("xorg", "yorg"):
        ok(world["user"][org].post(f"/v1/jobs/{second}/approve"))
    xorg, yorg = (Api(broker, world["orgs"][org]["organization_token"]) for org in ("xorg", "yorg"))
    assert xorg.put(_messages(first, "x_owner.a", "y_owner"), data=b"a" * 900).status_code == 201
    for body in (b"b" * 700, iter([b"b" * 350, b"b" * 350])):  # declared up front, or only known at commit
        refused = xorg.put(_messages(second, "x_owner.b", "y_owner"), data=body)
        assert refused.status_code == 507 and refused.json()["error"] == {
            "code": "org_quota_exceeded", "message": "your organization has 8.38e-07 GiB waiting for its recipients "
            "across its jobs and this broker holds at most 1.4e-06 GiB per organization; send again once they took "
            "some"}
    assert yorg.put(_messages(second, "y_owner.c", "x_owner"), data=b"c" * 900).status_code == 201
    assert yorg.delete(_messages(first, "x_owner.a")).status_code == 204  # taken: room again
    assert xorg.put(_messages(second, "x_owner.b", "y_owner"), data=b"b" * 700).status_code == 201
    # In number too (each put sums them): one waiting (x_owner.b), two more fit, a fourth does not.
    assert xorg.put(_messages(first, "x_owner.d", "helper")).status_code == 201
    assert xorg.put(_messages(second, "x_owner.e", "helper")).status_code == 201
    counted = xorg.put(_messages(second, "x_owner.f", "helper"))
    assert counted.status_code == 507 and counted.json()["error"] == {
        "code": "org_quota_exceeded", "message": "your organization has 3 messages waiting for its recipients across "
        "its jobs and this broker holds at most 3 per organization; send again once they took some"}


def test_a_seat_has_bounded_messages_waiting_and_a_listing_names_the_oldest_thousand(start_cape_server):
    """A party flooding a partner's mailbox with empty messages (no bytes, so --max-job-bytes never binds) is held
    at --max-job-messages; and however full a mailbox is, one listing names its oldest 1,000: whole, 200,000
    names took 4 s to list on the event loop, holding every other organization's requests up at each poll."""
    server = start_cape_server(extra_args=["--max-job-messages", "3"])
    world = build_job_world(server)
    jid, helper, yorg = world["job"]["id"], world["worker"]["helper"], world["worker"]["yorg"]
    for n in range(3):
        assert helper.put(_messages(jid, f"helper.junk-{n}", "y_owner"), data=b"").status_code == 201
    full = helper.put(_messages(jid, "helper.junk-3", "x_owner"), data=b"")
    assert full.status_code == 507 and full.json()["error"] == {
        "code": "job_quota_exceeded", "message": "seat helper has 3 messages waiting for its recipients in this job "
        "and this broker holds at most 3 per seat and job; send again once they took some"}
    assert helper.put(_messages(jid, "helper.junk-0", "y_owner"), data=b"").status_code == 200  # a repeat is fine
    assert world["worker"]["xorg"].put(_messages(jid, "x_owner.a", "y_owner"), data=b"").status_code == 201
    assert yorg.delete(_messages(jid, "helper.junk-0")).status_code == 204
    assert helper.put(_messages(jid, "helper.junk-3", "x_owner"), data=b"").status_code == 201

    # However they came (an older server, a larger limit), a listing stays bounded: rows straight into the index.
    index = sqlite3.connect(server.data_dir / "broker" / "index.sqlite3", isolation_level=None)
    start = time.time() + 1
    with index:
        index.executemany("INSERT INTO messages VALUES (?, 'y_owner', ?, 'helper', 0, ?, ?, NULL)",
                          [(jid, f"helper.more-{n:04d}", f"none-{n}.msg", start + n / 1000) for n in range(1500)])
    index.close()
    listed = yorg.get(_messages(jid)).json()
    assert len(listed) == 1000 and listed[0]["name"] == "helper.junk-1" and listed[-1]["name"] == "helper.more-0996"
    both = yorg.get("/broker/v1/messages", params={"job": jid}).json()["jobs"][jid]
    assert [m["name"] for m in both] == [m["name"] for m in listed]


def test_the_broker_keeps_its_disk_reserve(start_cape_server):
    server = start_cape_server(extra_args=["--min-free-bytes", str(2**62)])
    world = build_job_world(server)
    refused = world["worker"]["xorg"].put(_messages(world["job"]["id"], "x_owner.a", "y_owner"), data=b"a")
    assert refused.status_code == 507 and refused.json()["error"] == {
        "code": "broker_disk_full",
        "message": "the broker's disk is nearly full; try again later (its operator frees space or lowers "
                   "--min-free-bytes)"}
    assert "refused a message of 1 bytes" in server.log_path.read_text()
    # A monitor sees it before any worker is refused.
    health = requests.get(f"{server.url}/healthz", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    assert health.json()["problem"].endswith(f"below the {2**62} the server needs; the broker refuses new messages "
                                             "(--min-free-bytes)")


def test_a_chunked_body_is_checked_against_the_disk_reserve_as_it_grows(start_cape_server, tmp_path):
    """A body without a declared length passes the check at its start (as 0 bytes): it is checked again every
    64 MiB, and refused once it would eat into the reserve."""
    tmp_path.mkdir(exist_ok=True)
    reserve = shutil.disk_usage(tmp_path).free - 24 * 1024**2  # room for 24 MiB more, not for 80
    server = start_cape_server(extra_args=["--min-free-bytes", str(reserve)])
    world = build_job_world(server)
    piece = b"\x00" * (1 << 20)
    refused = world["worker"]["xorg"].put(_messages(world["job"]["id"], "x_owner.big", "y_owner"),
                                          data=(piece for _ in range(80)))
    assert refused.status_code == 507 and refused.json()["error"]["code"] == "broker_disk_full"
    assert list((server.data_dir / "broker" / "incoming").iterdir()) == []
    small = world["worker"]["xorg"].put(_messages(world["job"]["id"], "x_owner.small", "y_owner"), data=piece)
    assert small.status_code == 201


def test_an_expired_name_not_yet_swept_can_be_stored_again_and_no_body_is_left_behind(tmp_path):
    """The sweep runs every ttl/4: in between, a put under an expired name failed (500) and left its body on disk."""
    from services.broker.store import Commit, MessageStore

    def put(store: MessageStore, body: bytes) -> Commit:
        pending = store.begin(limit=100)
        pending.write(body)
        pending.finish()
        return store.commit("job", "y_owner", "m", "x_owner", pending)

    store = MessageStore(tmp_path, ttl_seconds=0.2)
    try:
        assert put(store, b"first") is Commit.CREATED
        time.sleep(0.3)  # expired, not swept
        assert put(store, b"second") is Commit.CREATED
        [message] = store.waiting("job", "y_owner")
        assert message.file.read_bytes() == b"second"
        assert sorted(store.bodies.iterdir()) == [message.file]
    finally:
        store.close()


def test_a_body_no_index_entry_names_is_removed_at_start(tmp_path):
    """A crash between storing a body and indexing it left a file nothing would read or expire."""
    from services.broker.store import Commit, MessageStore

    store = MessageStore(tmp_path, ttl_seconds=60)
    pending = store.begin(limit=100)
    pending.write(b"kept")
    pending.finish()
    assert store.commit("job", "y_owner", "m", "x_owner", pending) is Commit.CREATED
    store.close()
    (store.bodies / "0123abcd.msg").write_bytes(b"orphan")
    again = MessageStore(tmp_path, ttl_seconds=60)
    try:
        assert again.orphans_removed == 1
        [message] = again.waiting("job", "y_owner")
        assert sorted(again.bodies.iterdir()) == [message.file] and message.file.read_bytes() == b"kept"
    finally:
        again.close()


def _second_job(world) -> str:
    """Another approved job of the world's project (same seats)."""
    job = world["user"]["yorg"].post("/v1/projects/demo/jobs", json={
        "type": "linear_regression", "x": {"dataview": "xs", "columns": ["a", "b"]},
        "y": {"dataview": "ys", "column": "t"}, "model_owner": "yorg", "timeout": 600}).json()
    for label in ("xorg", "yorg"):
        assert world["user"][label].post(f"/v1/jobs/{job['id']}/approve").status_code == 200
    return job["id"]


def test_one_long_poll_covers_several_jobs_and_wakes_on_a_put_to_any(cape_server):
    """A worker with several active jobs waits on one request (it polled each job in turn, ~18 lists a second)."""
    world = build_job_world(cape_server)
    first, second = world["job"]["id"], _second_job(world)
    x, y = world["worker"]["xorg"], world["worker"]["yorg"]
    outsider = cape_server.create_org("outsider")
    listing = y.get("/broker/v1/messages", params={"job": [first, second], "wait": 0}).json()
    assert listing == {"jobs": {first: [], second: []}, "refused": {}}

    results: dict[str, object] = {}

    def poll() -> None:
        started = time.monotonic()
        results["answer"] = y.get("/broker/v1/messages", params={"job": [first, second], "wait": 10}).json()
        results["seconds"] = time.monotonic() - started

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(0.5)
    assert x.put(_messages(second, "x_owner.m", "y_owner"), data=b"sealed").status_code == 201
    waiter.join(timeout=15)
    answer = results["answer"]
    assert answer["jobs"][first] == [] and [m["name"] for m in answer["jobs"][second]] == ["x_owner.m"]
    assert results["seconds"] < 0.5 + 0.5  # within 0.5 s of the put (it came 0.5 s after the poll began)

    # A job this organization has no seat in is refused alone; a bad token refuses the whole request.
    foreign = Api(cape_server, outsider["organization_token"]).get(
        "/broker/v1/messages", params={"job": [first], "wait": 0}).json()
    assert foreign["jobs"] == {} and foreign["refused"][first]["code"] == "no_seat"
    assert Api(cape_server, "bad,token").get("/broker/v1/messages", params={"job": [first]}).status_code == 401
    too_many = y.get("/broker/v1/messages", params={"job": [f"j{i}" for i in range(51)]})
    assert too_many.status_code == 422 and "job" in too_many.json()["error"]["message"]

    client = BrokerClient(f"{cape_server.url}/broker", world["orgs"]["yorg"]["organization_token"])
    jobs, refused = client.wait_for_jobs_messages([first, second], 0)
    assert refused == {} and [m["name"] for m in jobs[second]] == ["x_owner.m"] and jobs[first] == []


def test_mailbox_events_last_only_while_a_poll_waits():
    """A server that saw many jobs kept one event per mailbox ever polled (about 2 KB a job, for ever)."""
    import asyncio

    from services.broker.mailboxes import MailboxSignals

    async def scenario() -> tuple[int, int, bool]:
        signals = MailboxSignals()

        async def poll(key: tuple[str, str], seconds: float) -> bool:
            with signals.watching([key]) as [event]:
                try:
                    await asyncio.wait_for(event.wait(), seconds)
                    return True
                except TimeoutError:
                    return False

        first = asyncio.ensure_future(poll(("job1", "y_owner"), 5))
        second = asyncio.ensure_future(poll(("job1", "y_owner"), 0.05))  # the same mailbox, giving up first
        other = asyncio.ensure_future(poll(("job2", "x_owner"), 0.05))
        await asyncio.sleep(0.01)
        while_waiting = signals.watched()
        await asyncio.sleep(0.1)
        signals.notify("job1", "y_owner")
        woken = await first
        await asyncio.gather(second, other)
        return while_waiting, signals.watched(), woken

    while_waiting, after, woken = asyncio.run(scenario())
    assert (while_waiting, after, woken) == (2, 0, True)


def test_a_broker_alone_says_its_coordinator_reports_a_problem(start_cape_server, tmp_path):
    """A degraded coordinator answers: the broker starts and works with it, and its operator is told why."""
    import subprocess

    from tests.support.server import cape_server_command

    troubled = start_cape_server(extra_args=["--min-free-bytes", str(2**62)], name="troubled")
    broker = subprocess.Popen([*cape_server_command(), "serve", "--port", "0", "--data-dir", str(tmp_path / "b"),
                               "--only", "broker", "--coordinator-url", troubled.url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert broker.stdout.readline().startswith("cape-server listening on ")
    finally:
        broker.terminate()
        _, err = broker.communicate(timeout=15)
    assert f"cape-server: warning: the coordinator at {troubled.url} reports a problem: the data dir's disk has" in err
    assert "does not answer now" not in err


def test_a_stored_message_is_durable_before_its_put_is_answered(tmp_path, monkeypatch):
    """Unit test with the directory fsync recorded (a power loss cannot be made here): the body's rename into
    bodies/ is made durable before the message's row exists, so a row never outlives its body's name; and the
    coordinator's commits are on disk before their answers (synchronous FULL), as an acknowledged report must be."""
    from pathlib import Path

    from services.broker import store as store_module
    from services.broker.store import Commit, MessageStore
    from services.coordinator.db import Database

    store = MessageStore(tmp_path, ttl_seconds=60)
    synced: list[tuple[Path, list[str], int]] = []

    def recording_fsync_dir(path: Path) -> None:
        synced.append((path, sorted(p.name for p in path.iterdir()), len(store.waiting("job", "y_owner"))))

    monkeypatch.setattr(store_module, "fsync_dir", recording_fsync_dir)
    try:
        pending = store.begin(limit=100)
        pending.write(b"sealed")
        pending.finish()
        assert store.commit("job", "y_owner", "m", "x_owner", pending) is Commit.CREATED
        [message] = store.waiting("job", "y_owner")
        assert synced == [(store.bodies, [message.file.name], 0)]  # renamed into bodies/, no row yet
    finally:
        store.close()
    db = Database(tmp_path / "coordinator" / "coordinator.sqlite3")
    try:
        with db.transaction() as conn:
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        db.close()
