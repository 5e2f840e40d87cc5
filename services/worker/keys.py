"""The worker's long-term key pairs: X25519 to receive encrypted messages, Ed25519 to sign sent ones.

Made on first start under the state directory (mode 0700, files 0600, PKCS#8 PEM) and reused afterwards. Several
programs may start at once: each key file is published with `os.link`, which never replaces an existing file, and
every program then loads what is on disk, so all four agree on one key pair.
"""
from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from services.worker.spool import atomic_write_bytes

ENCRYPTION_KEY_FILE = "encryption_key.pem"
SIGNING_KEY_FILE = "signing_key.pem"
# What each key file holds: the type it must load as, and its name in messages.
KEY_KINDS = {ENCRYPTION_KEY_FILE: (x25519.X25519PrivateKey, "X25519"),
             SIGNING_KEY_FILE: (ed25519.Ed25519PrivateKey, "Ed25519")}


class KeyFileError(Exception):
    """A key file or the state directory is unusable; the message says how to fix it."""


def b64_raw_public(key: x25519.X25519PublicKey | ed25519.Ed25519PublicKey) -> str:
    """The raw 32-byte public key, base64 (standard alphabet), as the coordinator stores it."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def fingerprint(encryption_public_b64: str, signing_public_b64: str) -> str:
    """`SHA256:<base64>` of a worker's two raw public keys, as ssh shows a host key's (partner_keys.py)."""
    raw = _raw32(encryption_public_b64, "encryption_public_key") + _raw32(signing_public_b64, "signing_public_key")
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def x25519_public_from_b64(text: str) -> x25519.X25519PublicKey:
    """Parse a base64 raw X25519 public key (from a WorkerJob's parties)."""
    return x25519.X25519PublicKey.from_public_bytes(_raw32(text, "encryption_public_key"))


def ed25519_public_from_b64(text: str) -> ed25519.Ed25519PublicKey:
    """Parse a base64 raw Ed25519 public key (from a WorkerJob's parties)."""
    return ed25519.Ed25519PublicKey.from_public_bytes(_raw32(text, "signing_public_key"))


def _raw32(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{what} is not valid base64") from exc
    if len(raw) != 32:
        raise KeyFileError(f"{what} must be 32 bytes, got {len(raw)}")
    return raw


@dataclass(frozen=True)
class WorkerKeys:
    """This worker's private keys (never logged, never sent) and their public halves."""

    encryption: x25519.X25519PrivateKey
    signing: ed25519.Ed25519PrivateKey

    @classmethod
    def load_or_create(cls, state_dir: Path | str) -> "WorkerKeys":
        """Load the key pairs from `state_dir`, creating the directory and the keys on first start."""
        folder = Path(state_dir)
        _prepare_state_dir(folder)
        return cls(_load_or_create(folder / ENCRYPTION_KEY_FILE), _load_or_create(folder / SIGNING_KEY_FILE))

    @property
    def encryption_public_b64(self) -> str:
        """Base64 raw X25519 public key for `PUT /v1/worker/keys`."""
        return b64_raw_public(self.encryption.public_key())

    @property
    def signing_public_b64(self) -> str:
        """Base64 raw Ed25519 public key for `PUT /v1/worker/keys`."""
        return b64_raw_public(self.signing.public_key())

    @property
    def fingerprint(self) -> str:
        """What partners' operators compare with the one their workers log when this worker's keys change."""
        return fingerprint(self.encryption_public_b64, self.signing_public_b64)

    def public_keys(self) -> dict[str, str]:
        """The body of `PUT /v1/worker/keys`."""
        return {"encryption_public_key": self.encryption_public_b64, "signing_public_key": self.signing_public_b64}

    def __repr__(self) -> str:  # never print private material
        return f"WorkerKeys(encryption_public={self.encryption_public_b64}, signing_public={self.signing_public_b64})"


def _prepare_state_dir(folder: Path) -> None:
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(folder.stat().st_mode) & 0o077:
            os.chmod(folder, 0o700)
    except PermissionError as exc:
        raise KeyFileError(
            f"cannot use the state directory {folder} (permission denied); set CAPE_STATE_DIR to a directory "
            "this user owns"
        ) from exc


def _load_or_create(path: Path):  # type: ignore[no-untyped-def]
    if not path.exists():
        pem = KEY_KINDS[path.name][0].generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # First writer wins (link never replaces); everyone then loads the winner's file.
        atomic_write_bytes(path, pem, overwrite=False, mode=0o600)
    return load_key_file(path)


def existing_fingerprint(state_dir: Path) -> str | None:
    """The fingerprint of the keys in `state_dir`, None before a first start made them (KeyFileError, OSError)."""
    if check_key_files(state_dir):
        return None
    return WorkerKeys(load_key_file(state_dir / ENCRYPTION_KEY_FILE), load_key_file(state_dir / SIGNING_KEY_FILE)
                      ).fingerprint


def check_key_files(state_dir: Path) -> list[str]:
    """Load the key files present in `state_dir` as the programs will (KeyFileError, or OSError if unreadable);
    returns the names of those still missing, which the first start makes."""
    present = [name for name in KEY_KINDS if (state_dir / name).exists()]
    for name in present:
        load_key_file(state_dir / name)
    return [name for name in KEY_KINDS if name not in present]


def load_key_file(path: Path):  # type: ignore[no-untyped-def]
    """The private key in `path` (one of KEY_KINDS), which only its owner may read; KeyFileError says what is wrong
    (`check` runs this on the files the programs will load)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(f"{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a readable private key; move it away to make a new one") from exc
    kind, name = KEY_KINDS[path.name]
    if not isinstance(key, kind):
        raise KeyFileError(f"{path} does not hold an {name} key; move it away to make a new one")
    return key
