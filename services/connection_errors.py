"""Why an HTTP connection to a Cape server failed, in words an operator can act on (TLS above all).

requests (worker, CLI) and httpx (a broker running alone) both wrap the cause of a failed connection several
layers deep; their own text is long and names internals. `connection_problem` reads the cause and says what to do.
The trust store for https:// is the libraries' own: requests reads REQUESTS_CA_BUNDLE, httpx reads SSL_CERT_FILE.
"""
from __future__ import annotations

import ipaddress
import os
import re
import ssl
from pathlib import Path
from urllib.parse import urlparse

# `openssl rehash` names: a directory of CAs is searched by these only (the subject's hash, a dot, a number).
_HASHED_NAME = re.compile(r"^[0-9a-f]{8}\.[0-9]+$")


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
        if "expired" in reason.lower():
            return f"its TLS certificate has expired ({reason}); the server's operator must renew it"
        if "not yet valid" in reason.lower():
            return (f"its TLS certificate is not valid yet ({reason}); check this machine's clock and the "
                    "server's certificate")
        trusted = os.environ.get(ca_variable)
        fix = (f"{ca_variable} ({trusted}) does not hold the CA that signed it" if trusted else
               f"set {ca_variable} to the PEM file of the CA that signed it")
        return (f"its TLS certificate is not trusted here ({reason}); {fix}, or the server does not send its "
                "intermediate certificates")
    if "no_certificate_or_crl_found" in lowered or "no certificate or crl found" in lowered:
        return f"{ca_variable} ({os.environ.get(ca_variable)}) holds no CA certificate; give the CA's PEM file"
    if any(unloadable_ca_file(part) for part in chain):  # its CA file went missing after the start's check
        return f"{ca_variable} ({os.environ.get(ca_variable)}) cannot be read; give the CA's PEM file"
    if "wrong version number" in lowered or "record layer failure" in lowered or "packet length too long" in lowered:
        return "it does not speak TLS on this port; use http:// for it, or its TLS port"
    if "refused" in lowered:
        return "connection refused"
    if any(words in lowered for words in ("name or service not known", "nodename nor servname", "name resolution",
                                          "nameresolutionerror", "no address associated")):
        return "the host name does not resolve; check the URL"
    # Before the closed-connection words: urllib3 wraps a send that timed out in "Connection aborted".
    if any(isinstance(part, TimeoutError) for part in chain) or "timed out" in lowered:
        return "no progress in time: a slow or stalled link, or a server that stopped answering"
    if urlparse(url).scheme == "http" and any(words in lowered for words in (
            "remotedisconnected", "connection aborted", "connection reset", "server disconnected",
            "remoteprotocolerror")):
        return ("the connection closed without an answer: the server restarting, or a TLS port, whose URL must "
                "start with https://")
    if "timeout" in type(exc).__name__.lower():
        return "no progress in time: a slow or stalled link, or a server that stopped answering"
    return type(exc).__name__


def unloadable_ca_file(exc: BaseException) -> bool:
    """requests' OSError (not a RequestException) for a REQUESTS_CA_BUNDLE it cannot load."""
    return isinstance(exc, OSError) and "CA certificate bundle" in str(exc)


def ca_file_problem(value: str, directory: bool | None = None) -> str | None:
    """What is wrong with `value` as a CA variable's (REQUESTS_CA_BUNDLE, SSL_CERT_FILE, SSL_CERT_DIR), or None if
    it loads as the libraries will load it: exactly the value (they do not strip it), a PEM file, or a directory
    searched by `openssl rehash` names. `directory`: True if it must be one, False if it must not, None if either."""
    if value != value.strip():
        return f"{value!r} has spaces around it, which the HTTP library would keep; remove them"
    path = Path(value)
    if directory is not None and path.exists() and path.is_dir() != directory:
        return f"{value!r} is {'not ' if directory else ''}a directory; give " + (
            "a directory of CA certificates" if directory else "the CA's PEM file")
    if path.is_dir():
        if not any(_HASHED_NAME.match(entry.name) for entry in path.iterdir()):
            return (f"{value!r} is a directory without `openssl rehash` names, so no CA in it is found; run "
                    f"`openssl rehash {value}`, or give the CA's PEM file")
        return None
    try:
        ssl.create_default_context(cafile=value)
    except FileNotFoundError:
        return f"{value!r} does not exist; give the PEM file of the CA that signed the server's certificate"
    except ssl.SSLError:
        return f"{value!r} holds no PEM certificate; give the PEM file of the CA that signed the server's certificate"
    except OSError as exc:
        return f"{value!r} cannot be read ({exc.strerror})"
    return None


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
