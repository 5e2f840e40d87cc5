"""`cape-server serve` start-up: the announced address, bad options, an occupied port."""
from __future__ import annotations

import socket
import subprocess
import time
from importlib.metadata import version

import requests

from tests.support.server import cape_server_command


def test_serve_announces_its_address_and_serves_openapi(cape_server):
    assert cape_server.url.startswith("http://127.0.0.1:")
    health = requests.get(f"{cape_server.url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["parts"] == ["coordinator", "broker"]
    assert health["version"] == version("cape-workers")
    document = requests.get(f"{cape_server.url}/openapi.json", timeout=10).json()
    assert document["info"]["title"] == "Cape server" and document["info"]["version"] == health["version"]


def test_only_coordinator_has_no_broker(start_cape_server):
    server = start_cape_server(extra_args=["--only", "coordinator"])
    assert requests.get(f"{server.url}/healthz", timeout=10).json()["parts"] == ["coordinator"]
    paths = requests.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]
    assert "/broker/v1/jobs/{job}/messages" not in paths and "/v1/projects" in paths


def test_broker_alone_needs_a_coordinator_url(tmp_path):
    result = subprocess.run([*cape_server_command(), "serve", "--only", "broker", "--port", "0",
                             "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--only broker needs --coordinator-url" in result.stderr


def test_occupied_port_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([*cape_server_command(), "serve", "--port", str(port), "--data-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "pick another --port" in result.stderr


def test_admin_bootstrap_makes_a_private_data_dir(tmp_path):
    data_dir = tmp_path / "fresh"
    result = subprocess.run([*cape_server_command(), "admin", "create-org", "acme", "--admin-email", "a@acme.example",
                             "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (data_dir.stat().st_mode & 0o777) == 0o700
    lines = result.stdout.splitlines()
    assert lines[0].startswith("organization acme (") and "CAPE_TOKEN" in lines[1] and "cape login" in lines[2]


def test_accepted_connections_get_tcp_nodelay():
    """asyncio (uvicorn's loop) sets TCP_NODELAY on accepted connections only for an IPPROTO_TCP listener."""
    import asyncio

    from services.server.cli import listening_socket

    async def accepted_nodelay() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                conn = transport.get_extra_info("socket")
                seen.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        sock = listening_socket("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            value = await asyncio.wait_for(seen, timeout=10)
            writer.close()
            return value
        finally:
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_keep_alive_requests_do_not_wait_for_delayed_acks(cape_server):
    # With Nagle's algorithm on the server's connections, each request after the first on a kept-alive connection
    # waits ~40 ms for the client's delayed ACK: 20 requests took > 0.8 s. Without it they take a few ms each.
    with requests.Session() as session:
        session.get(f"{cape_server.url}/healthz", timeout=10).raise_for_status()
        started = time.perf_counter()
        for _ in range(20):
            session.get(f"{cape_server.url}/healthz", timeout=10).raise_for_status()
        elapsed = time.perf_counter() - started
    assert elapsed < 0.6, f"20 keep-alive requests took {elapsed:.2f} s"
