"""HTTP client for the coordinator's worker endpoints (`/v1/login`, `/v1/worker/...`), authenticated by CAPE_TOKEN.

Errors are typed so the poller can tell "retry later" (`CoordinatorUnreachable`) from "fix the configuration"
(`CoordinatorAuthError`) from "this job is over" (`JobEnded`). No message carries the token.
"""
from __future__ import annotations

from typing import Any

import requests

from services.connection_errors import connection_problem, unloadable_ca_file
from services.coordinator.job_changes import VERSION_HEADER
from services.worker.api_errors import error_of, token_refusal

DEFAULT_TIMEOUT = 10.0


class CoordinatorError(RuntimeError):
    """The coordinator answered with an error the worker cannot fix by retrying."""


class CoordinatorUnreachable(CoordinatorError):
    """The coordinator could not be reached or answered 5xx: retry with backoff."""


class CoordinatorUntrusted(CoordinatorUnreachable):
    """TLS failed: the coordinator's certificate is not trusted here (or not its name's, or expired), or it does not
    speak TLS, or the CA file cannot be read. Retrying will not fix it: it needs the operator."""


class CoordinatorMisaddressed(CoordinatorError):
    """The server at CAPE_COORDINATOR answered, but has no login: not a Cape coordinator, or not its base URL."""


class CoordinatorNoRoute(CoordinatorError):
    """A 405, or a 404 without a Cape error of its own: the coordinator has no such route (an older version)."""


class RequestRefused(CoordinatorError):
    """422: the coordinator refused a request's body, e.g. an older coordinator a field it does not know."""


class CoordinatorAuthError(CoordinatorError):
    """The coordinator refused CAPE_TOKEN (401/403)."""


class SeatTaken(CoordinatorError):
    """409: another worker of this organization, with other keys, holds its seat (two workers share a token)."""


class KeysNotRegistered(CoordinatorError):
    """409 to a heartbeat: the coordinator holds no keys for this organization (its data restored from a backup
    older than this worker's start, say): register them again."""


class JobEnded(CoordinatorError):
    """A report was refused with 409 because the job is no longer Approved or Started (Stopped, Error, Completed,
    Rejected)."""

    def __init__(self, job_id: str, status: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.status = status


class CoordinatorClient:
    """Worker-side calls to the coordinator at `base_url` (e.g. `http://127.0.0.1:8000`)."""

    def __init__(self, base_url: str, token: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._token = token  # its id (not its secret) names it in a refusal
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {token}"
        self._session.headers["User-Agent"] = "cape-worker"

    def close(self) -> None:
        self._session.close()

    def login(self) -> dict[str, Any]:
        """`POST /v1/login`; returns the identity (`kind`, `organization`, ...)."""
        return self._request("POST", "/v1/login").json()

    def registered_keys(self) -> dict[str, Any] | None:
        """`GET /v1/worker/keys`: the keys the coordinator holds for this organization and whether their worker is
        heard from; None from an older coordinator without the route."""
        try:
            return self._request("GET", "/v1/worker/keys").json()
        except CoordinatorNoRoute:
            return None

    def register_keys(self, encryption_public_key: str, signing_public_key: str) -> None:
        """`PUT /v1/worker/keys` with base64 raw public keys."""
        self._request("PUT", "/v1/worker/keys", json={"encryption_public_key": encryption_public_key,
                                                      "signing_public_key": signing_public_key})

    def heartbeat(self, version: str | None = None, programs: dict[str, str] | None = None,
                  signing_public_key: str | None = None, stopping: bool = False,
                  timeout: float | None = None) -> None:
        """`POST /v1/worker/heartbeat`; with this worker's key, so it is refused (`SeatTaken`) once another worker
        registered other keys for the organization; `stopping`: the worker is going away (shown offline at once)."""
        body: dict[str, Any] = {"stopping": True} if stopping else {}
        if signing_public_key:
            body["signing_public_key"] = signing_public_key
        if version:
            body["version"] = version
        if programs:
            body["programs"] = programs
        self._request("POST", "/v1/worker/heartbeat", json=body, timeout=timeout)

    def jobs(self) -> list[dict[str, Any]]:
        """`GET /v1/worker/jobs`: approved or started jobs where this organization holds a seat."""
        return self._request("GET", "/v1/worker/jobs").json()

    def wait_for_jobs(self, after: int | None, wait: float) -> tuple[list[dict[str, Any]], int | None]:
        """`GET /v1/worker/jobs?wait=&after=`: the jobs once their version differs from `after` (or after `wait`
        seconds), and the version they reflect (None from a coordinator that does not long-poll)."""
        params = {"wait": f"{wait:g}", **({"after": str(after)} if after is not None else {})}
        response = self._request("GET", "/v1/worker/jobs", params=params, timeout=wait + self.timeout)
        version = response.headers.get(VERSION_HEADER, "")
        return response.json(), int(version) if version.isdigit() else None

    def job(self, job_id: str) -> dict[str, Any]:
        """`GET /v1/worker/jobs/{id}`: one job in any status."""
        return self._request("GET", f"/v1/worker/jobs/{job_id}").json()

    def report(self, job_id: str, report: dict[str, Any]) -> None:
        """`POST /v1/worker/jobs/{id}/report`; raises `JobEnded` when the coordinator says the job is over."""
        self._request("POST", f"/v1/worker/jobs/{job_id}/report", json=report, job_id=job_id)

    def _request(self, method: str, path: str, json: Any = None, job_id: str | None = None,
                 params: dict[str, str] | None = None, timeout: float | None = None) -> requests.Response:
        url = self.base_url + path
        try:
            response = self._session.request(method, url, json=json, params=params,
                                             timeout=timeout or self.timeout)
        except requests.RequestException as exc:
            kind = CoordinatorUntrusted if isinstance(exc, requests.exceptions.SSLError) else CoordinatorUnreachable
            raise kind(f"cannot reach the coordinator at {self.base_url} ({connection_problem(exc, self.base_url)}); "
                       "check CAPE_COORDINATOR and the network") from None
        except OSError as exc:  # requests' own are OSErrors too, caught above: this is its CA file going missing
            if not unloadable_ca_file(exc):
                raise
            raise CoordinatorUntrusted(f"cannot load the CA certificates to reach {self.base_url} ({exc}); check "
                                       "REQUESTS_CA_BUNDLE") from None
        if response.status_code < 400:
            return response
        code, message = error_of(response)
        if code is None:
            message = f"{message} (not a Cape coordinator response; check the URL)"
        if response.status_code >= 500:
            raise CoordinatorUnreachable(f"the coordinator at {self.base_url} answered {response.status_code} to "
                                         f"{method} {path}: {message}")
        if response.status_code == 401:
            raise CoordinatorAuthError(f"the coordinator at {self.base_url} refused CAPE_TOKEN: "
                                       f"{token_refusal(code, message, self._token)}")
        if response.status_code == 409 and code in ("worker_keys_in_use", "other_worker_keys"):
            raise SeatTaken(f"the coordinator at {self.base_url} refused this worker: {message}")
        if response.status_code == 409 and code == "keys_not_registered":
            raise KeysNotRegistered(f"the coordinator at {self.base_url} holds no keys for this worker: {message}")
        if response.status_code == 409 and job_id is not None:
            raise JobEnded(job_id, _status_in(message), f"job {job_id} is over at the coordinator: {message}")
        if response.status_code in (404, 405) and path == "/v1/login":
            raise CoordinatorMisaddressed(f"the server at {self.base_url} has no {method} {path} ({message}); check "
                                          "CAPE_COORDINATOR: the coordinator's base URL, without /v1")
        if response.status_code == 403 and path == "/v1/login":
            raise CoordinatorAuthError(f"the coordinator refused CAPE_TOKEN: {message}")
        # An older coordinator: no such path (a generic 404), or the path for another method only (405, e.g. GET
        # /v1/worker/keys before it could be read).
        no_route = response.status_code == 405 or (response.status_code == 404 and code in (None, "not_found"))
        kind = CoordinatorNoRoute if no_route else RequestRefused if response.status_code == 422 else CoordinatorError
        raise kind(f"{method} {path} failed with {response.status_code} {code or 'error'}: {message}")


def _status_in(message: str) -> str:
    """The job status named in a 409 message (`... is Stopped`), or `Ended` if none is named."""
    for status in ("Stopped", "Error", "Completed", "Rejected"):
        if status in message:
            return status
    return "Ended"
