"""Cape's token format, `<token_id>,<base64 secret>`, and the hash the database keeps instead of the secret."""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from services.coordinator.db import new_id


@dataclass(frozen=True)
class IssuedToken:
    """A freshly made token: `text` goes to the holder once, `secret_hash` to the database."""

    id: str
    text: str
    secret_hash: str


def hash_secret(secret: str) -> str:
    # The secret is 32 random bytes, so a plain SHA-256 cannot be brute-forced; no slow KDF is needed.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def issue_token() -> IssuedToken:
    """Make a new token with a 32-byte random secret."""
    token_id = new_id()
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii")
    return IssuedToken(id=token_id, text=f"{token_id},{secret}", secret_hash=hash_secret(secret))


def split_token(text: str) -> tuple[str, str] | None:
    """`<id>,<secret>` -> (id, secret), or None when the text is not shaped like a token."""
    token_id, sep, secret = text.strip().partition(",")
    if not sep or not token_id or not secret or len(text) > 512:
        return None
    return token_id, secret


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)
