"""The HTTP session to the coordinator: bearer auth, JSON, and errors turned into typed exceptions."""
from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlparse

import requests

from services.client.errors import ApiError, BadArgument, CoordinatorUnreachable, NotConfigured
from services.connection_errors import connection_problem, unloadable_ca_file

DEFAULT_TIMEOUT_S = 30.0
NEXT_CURSOR_HEADER = "X-Cape-Next-Cursor"  # the coordinator's paged listings (services/CONTRACTS.md)
# A token (<id>,<secret>) given where the URL goes, e.g. CAPE_COORDINATOR and CAPE_TOKEN swapped: never echoed.
_TOKEN_LIKE = re.compile(r"[^\s:/]+,\S+")


class ApiSession:
    """Calls the coordinator's ``/v1`` API with a token; returns decoded JSON or raises a ``CapeError``."""

    def __init__(self, endpoint: str, token: str | None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._http = requests.Session()

    @property
    def has_token(self) -> bool:
        """Whether a token is set (the token itself is never exposed)."""
        return bool(self._token)

    @property
    def token_id(self) -> str | None:
        """The token's public id (before the comma), or None without a token."""
        return self._token.split(",", 1)[0] if self._token else None

    def request(self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        """Send one request; return the JSON body (None for 204) or raise ``ApiError``."""
        return self._decoded(self._send(method, path, json, params))

    def get_page(self, path: str, params: dict[str, Any]) -> tuple[Any, str | None]:
        """One page of a paged listing: its JSON body and the cursor of the next page (None on the last)."""
        response = self._send("GET", path, None, params)
        return self._decoded(response), response.headers.get(NEXT_CURSOR_HEADER) or None

    def _send(self, method: str, path: str, json: Any, params: dict[str, Any] | None) -> requests.Response:
        if not self._token:
            raise NotConfigured(
                "no token: run `cape login --coordinator URL --token TOKEN` or set CAPE_TOKEN"
            )
        url = f"{self.endpoint}{path}"
        try:
            response = self._http.request(
                method,
                url,
                json=json,
                params=params,
                headers={"Authorization": f"Bearer {self._token}"},
                timeout=self._timeout,
            )
        except requests.exceptions.ConnectionError as exc:
            raise CoordinatorUnreachable(
                f"cannot reach the coordinator at {self.endpoint} ({connection_problem(exc, url)}); check the URL "
                "(cape login --coordinator, CAPE_COORDINATOR) and that the server is running"
            ) from None
        except requests.exceptions.InvalidHeader:
            # requests quotes the header, so its message would hold the token: never shown.
            raise BadArgument("the token holds a character an HTTP header cannot carry; copy it again, on one line "
                              "(it looks like <id>,<secret>)") from None
        except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema,
                requests.exceptions.InvalidURL):
            raise BadArgument(invalid_url_message(self.endpoint)) from None
        except requests.exceptions.Timeout:
            raise CoordinatorUnreachable(
                f"the coordinator at {self.endpoint} did not answer within {self._timeout:g} s"
            ) from None
        except OSError as exc:  # after requests' own (they are OSErrors too): requests could not load its CAs
            if not unloadable_ca_file(exc):
                raise
            variable = next((v for v in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE") if os.environ.get(v)),
                            "REQUESTS_CA_BUNDLE")
            raise BadArgument(f"{variable} names {os.environ.get(variable)!r}, which is not a file (or directory) "
                              "of CA certificates; give the PEM file of the CA that signed the coordinator's "
                              "certificate") from None
        if response.status_code >= 400:
            raise _api_error(response, self.endpoint)
        return response

    def _decoded(self, response: requests.Response) -> Any:
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ApiError(
                response.status_code, "bad_response",
                f"the server at {self.endpoint} did not answer with JSON; is it a Cape coordinator?",
            ) from None

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, json: Any = None) -> Any:
        return self.request("POST", path, json=json if json is not None else {})

    def put(self, path: str, json: Any = None) -> Any:
        return self.request("PUT", path, json=json)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def invalid_url_message(url: str) -> str:
    """Why `url` is no coordinator URL, without repeating it when it looks like a token."""
    if _TOKEN_LIKE.fullmatch(url.strip()):
        return ("the coordinator URL looks like a token (<id>,<secret>), so it is not shown: were --coordinator and "
                "--token (or CAPE_COORDINATOR and CAPE_TOKEN) swapped? Give the URL as http(s)://HOST[:PORT]")
    return f"the coordinator URL {url!r} is not valid; give it as http(s)://HOST[:PORT]"


def _api_error(response: requests.Response, endpoint: str) -> ApiError:
    """Build an ``ApiError`` from the contract's error body, tolerating other shapes."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = str(error.get("code", "error"))
        no_route = status == 404 and str(error.get("message", "")).startswith("no such endpoint")  # not a job's 404
        if no_route or (status, code) == (405, "method_not_allowed"):
            # A route this cape knows and the coordinator does not: "no such endpoint" said nothing to do.
            return ApiError(status, code, f"the coordinator at {endpoint} has no {response.request.method} "
                                          f"{urlparse(response.request.path_url).path}: it is older than this cape; "
                                          "upgrade cape-server, or use the cape of its version")
        return ApiError(status, code, str(error.get("message", "")).strip() or response.reason or "request failed")
    if isinstance(body, dict) and "detail" in body:
        # A framework-default body (e.g. FastAPI validation): name the fields if we can.
        detail = body["detail"]
        if isinstance(detail, list):
            fields = [".".join(str(p) for p in d.get("loc", [])[1:]) for d in detail if isinstance(d, dict)]
            message = "invalid field(s): " + ", ".join(f for f in fields if f) if any(fields) else "invalid request"
        else:
            message = str(detail)
        return ApiError(status, "error", message)
    # Not Cape's error body: a proxy in front of a coordinator that is away, or another service at this URL.
    reason = response.reason or "request failed"
    if status >= 500 and status != 501:
        return ApiError(status, "error", f"{reason}; the coordinator at {endpoint} (or a proxy in front of it) is "
                                         "unavailable; try again shortly")
    return ApiError(status, "error", f"{reason}; the server at {endpoint} did not answer as a Cape coordinator "
                                     "does: is the URL the coordinator's base URL?")
