"""The partner organizations' worker keys this worker has seen, to say when they change.

Workers learn each other's public keys from the coordinator alone: a coordinator that handed out keys of its own
could read and forge what two workers send each other. Nothing on this side can prevent that. What a worker can do,
as ssh does for hosts, is notice that an organization it worked with before shows other keys, and say it with both
fingerprints, which the two operators compare (`cape-worker status` shows a worker's own). A worker moved to a new
machine, or whose state was lost, has new keys too: that is the common reason, and the notice says so.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.worker.keys import KeyFileError, fingerprint
from services.worker.spool import atomic_write_bytes

BOOK_FILE = "partner-keys.json"

log = logging.getLogger("cape.poller")


@dataclass(frozen=True)
class KeyChange:
    """An organization whose worker shows other keys in `job` than when this worker last saw it."""

    job: str
    organization: str
    before: str
    after: str
    last_job: str
    last_seen: str

    def line(self) -> str:
        return (f"job {self.job}: organization {self.organization}'s worker shows other keys than it did from job "
                f"{self.last_job} ({self.last_seen}) on: {self.after}, was {self.before}. A worker moved to a new "
                "machine or that lost its state dir makes new keys; if that is not why, the coordinator may be "
                f"handing out keys of its own: ask {self.organization}'s operator for the fingerprint `cape-worker "
                "status` shows there")


class PartnerKeyBook:
    """The fingerprint each partner organization's worker showed last, in the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / BOOK_FILE

    def note(self, spec: dict[str, Any]) -> list[KeyChange]:
        """Record the fingerprints of the other seats' workers in a job from the coordinator; returns those that
        changed since this worker last saw their organization (a first sight is no change)."""
        book = self._read()
        changes, recorded = [], False
        parties = spec.get("parties") if isinstance(spec.get("parties"), dict) else {}
        own = _org_id(parties.get(spec.get("seat")))
        for party in parties.values():
            # Another shape is skipped, not raised: the poller stored the job already, and the runner says what
            # is wrong with it.
            org_id = _org_id(party)
            if org_id is None or org_id == own:
                continue  # its own keys are this worker's, in whichever seat: no partner's
            keys = (party.get("encryption_public_key"), party.get("signing_public_key"))
            if None in keys:
                continue
            try:
                seen = fingerprint(*keys)
            except (KeyFileError, TypeError):  # not a key: the runner refuses such a job, naming the seat
                continue
            before = book.get(org_id) if isinstance(book.get(org_id), dict) else None
            if before is not None and before.get("fingerprint") == seen:
                continue
            if before is not None:
                label = party["organization"].get("label") or org_id
                changes.append(KeyChange(spec["id"], str(label), str(before.get("fingerprint")), seen,
                                         str(before.get("job", "?")), str(before.get("seen_at", "?"))))
            book[org_id] = {"fingerprint": seen, "job": spec["id"],
                            "seen_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            recorded = True
        if recorded:
            self._write(book)
        return changes

    def _read(self) -> dict[str, Any]:
        try:
            book = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # damaged: start afresh (the next change goes unnoticed once)
            log.warning("cannot read %s (%s); the partners' keys are recorded afresh", self.path, exc)
            return {}
        return book if isinstance(book, dict) else {}

    def _write(self, book: dict[str, Any]) -> None:
        atomic_write_bytes(self.path, json.dumps(book, sort_keys=True, indent=1).encode(), mode=0o600)


def _org_id(party: Any) -> str | None:
    """A party's organization id, None for a party of another shape."""
    organization = party.get("organization") if isinstance(party, dict) else None
    org_id = organization.get("id") if isinstance(organization, dict) else None
    return org_id if isinstance(org_id, str) and org_id else None
