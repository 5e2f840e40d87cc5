"""A job as this worker sees it: the coordinator's WorkerJob (CONTRACTS.md), validated, with party numbers."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from services.worker.keys import KeyFileError, ed25519_public_from_b64, x25519_public_from_b64
from services.worker.spool import InvalidName, validate_job_id, validate_seat

# Party numbers of the engine: 0 = x_owner, 1 = y_owner, 2 = the third seat (model_owner or helper).
SEAT_INDEX = {"x_owner": 0, "y_owner": 1, "model_owner": 2, "helper": 2}
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600  # the coordinator's bound on a job's timeout (CONTRACTS.md)


class JobSpecError(ValueError):
    """The job description from the coordinator is incomplete or inconsistent; the message names the field."""


@dataclass(frozen=True)
class Party:
    """One seat of a job: its party number, organization and public keys."""

    seat: str
    index: int
    organization: str
    encryption_key: x25519.X25519PublicKey
    signing_key: ed25519.Ed25519PublicKey


@dataclass(frozen=True)
class JobSpec:
    """The parts of a WorkerJob the messenger and the runner use."""

    id: str
    type: str
    seat: str
    outputs_to: str
    timeout: float
    parties: dict[str, Party]
    task: dict[str, Any]
    approved_at: str | None = None  # the coordinator's time: the order in which the runner takes jobs

    @property
    def index(self) -> int:
        """This worker's party number."""
        return self.parties[self.seat].index

    def seat_of(self, index: int) -> str:
        """The seat holding party number `index`."""
        for party in self.parties.values():
            if party.index == index:
                return party.seat
        raise JobSpecError(f"the job has no party {index}")

    @property
    def x_columns(self) -> list[str]:
        """The x columns, in the order the weights come back."""
        return list(self.task["x"]["columns"])

    @property
    def y_column(self) -> str:
        """The y column."""
        return str(self.task["y"]["column"])

    def data_uri(self) -> str | None:
        """This seat's dataview uri (x_owner: the x dataview, y_owner: the y dataview; None otherwise)."""
        part = {"x_owner": "x", "y_owner": "y"}.get(self.seat)
        if part is None:
            return None
        dataview = self.task[part].get("dataview")
        uri = dataview.get("uri") if isinstance(dataview, dict) else None
        if not uri:
            raise JobSpecError(
                f"the job gives no uri for this organization's {part} dataview (task.{part}.dataview.uri)")
        return str(uri)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> "JobSpec":
        """Validate a WorkerJob dict; raises `JobSpecError` naming the bad field."""
        if not isinstance(raw, dict):
            raise JobSpecError("bad job description: not a JSON object")
        try:
            job_id = validate_job_id(raw.get("id"))  # type: ignore[arg-type]
            seat = validate_seat(raw.get("seat"))  # type: ignore[arg-type]
            outputs_to = validate_seat(raw.get("outputs_to"))  # type: ignore[arg-type]
        except InvalidName as exc:
            raise JobSpecError(f"bad job description: {exc}") from None
        parties: dict[str, Party] = {}
        listed = raw.get("parties") or {}
        if not isinstance(listed, dict):
            raise JobSpecError("parties must be an object of seats")
        for party_seat, info in listed.items():
            if party_seat not in SEAT_INDEX:
                raise JobSpecError(f"unknown seat {party_seat!r} in parties")
            if not isinstance(info, dict) or not isinstance(info.get("organization") or {}, dict):
                raise JobSpecError(f"parties.{party_seat} must be an object with the seat's organization and keys")
            try:
                parties[party_seat] = Party(
                    seat=party_seat,
                    index=SEAT_INDEX[party_seat],
                    organization=str((info.get("organization") or {}).get("label", "?")),
                    encryption_key=x25519_public_from_b64(info["encryption_public_key"]),
                    signing_key=ed25519_public_from_b64(info["signing_public_key"]),
                )
            except (KeyError, TypeError, KeyFileError) as exc:
                raise JobSpecError(f"parties.{party_seat}: missing or bad public key ({exc})") from None
        if sorted(p.index for p in parties.values()) != [0, 1, 2]:
            raise JobSpecError("parties must be x_owner, y_owner and one of model_owner/helper")
        if seat not in parties or outputs_to not in parties:
            raise JobSpecError("seat and outputs_to must name seats listed in parties")
        task = raw.get("task")
        if not isinstance(task, dict) or not isinstance(task.get("x"), dict) or not isinstance(task.get("y"), dict):
            raise JobSpecError("task must have x and y, each an object")
        try:
            timeout = float(raw.get("timeout") or 600)
        except (TypeError, ValueError):
            timeout = math.nan
        if not 1 <= timeout <= MAX_TIMEOUT_SECONDS:  # NaN too: a wait bounded by it would never end
            raise JobSpecError(f"timeout must be a number of seconds from 1 to {MAX_TIMEOUT_SECONDS}")
        approved_at = raw.get("approved_at")
        return cls(job_id, str(raw.get("type", "linear_regression")), seat, outputs_to, timeout, parties, task,
                   approved_at if isinstance(approved_at, str) else None)
