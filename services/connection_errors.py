"""Why an HTTP connection to a Cape server failed, in words an operator can act on (TLS above all).

requests (worker, CLI) and httpx (a broker running alone) both wrap the cause of a failed connection several
layers deep; their own text is long and names internals. `connection_problem` reads the cause and says what to do.
The trust store for https:// is the libraries' own: requests reads REQUESTS_CA_BUNDLE, httpx reads SSL_CERT_FILE.
"""
from __future__ import annotations

import ipaddress
import ssl
from urllib.parse import urlparse


def connection_problem(exc: BaseException, url: str, ca_variable: str = "REQUESTS_CA_BUNDLE") -> str:
    """A short reason for a failed connection to `url`, with the fix when it is a TLS one; else the error's kind.

    `ca_variable` is the variable that names extra trusted CAs for the library that failed.
    """
    chain = _chain(exc)
    lowered = " ".join(str(part) for part in chain).lower()
    verify = next((e for e in chain if isinstance(e, ssl.SSLCertVerificationError)), None)
    if verify is not None or "certificate verify failed" in lowered:
        reason = str(getattr(verify, "verify_message", "") or "not trusted").rstrip(".")
        if "mismatch" in reason.lower():
            return (f"its TLS certificate is not valid for this host name ({reason}); use the name or address the "
                    "certificate was issued for")
        return (f"its TLS certificate is not trusted here ({reason}); set {ca_variable} to the PEM file of the "
                "CA that signed it")
    if "wrong version number" in lowered or "record layer failure" in lowered or "packet length too long" in lowered:
        return "it does not speak TLS on this port; use http:// for it, or its TLS port"
    if "refused" in lowered:
        return "connection refused"
    if any(words in lowered for words in ("name or service not known", "nodename nor servname", "name resolution",
                                          "nameresolutionerror", "no address associated")):
        return "the host name does not resolve; check the URL"
    if urlparse(url).scheme == "http" and ("remotedisconnected" in lowered or "connection aborted" in lowered
                                            or "connection reset" in lowered):
        return ("the connection closed without an answer: the server restarting, or a TLS port, whose URL must "
                "start with https://")
    if "timed out" in lowered or "timeout" in type(exc).__name__.lower():
        return "no answer in time"
    return type(exc).__name__


def is_loopback(host: str | None) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1): traffic that never leaves the machine."""
    if not host:
        return False
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_http_to_another_host(url: str) -> bool:
    """An http:// URL whose host is not this machine: its bearer tokens would cross a network unencrypted."""
    parsed = urlparse(url)
    return parsed.scheme == "http" and not is_loopback(parsed.hostname)


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc`, its causes and contexts, and the exceptions in its args (urllib3 keeps the cause in `reason`)."""
    seen: list[BaseException] = []
    pending = [exc]
    while pending and len(seen) < 20:
        current = pending.pop()
        if current in seen:
            continue
        seen.append(current)
        for nested in (current.__cause__, current.__context__, getattr(current, "reason", None),
                       *[arg for arg in current.args if isinstance(arg, BaseException)]):
            if isinstance(nested, BaseException):
                pending.append(nested)
    return seen
