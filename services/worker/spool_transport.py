"""The engine's `Transport` over the spool: sent arrays are sealed into the outbox, received ones read from the inbox.

`send` writes the array as .npy (header + raw bytes, streamed through the sealer) into a sealed outbox file; the
first write of a name wins, so a replaying runner never produces a second, different ciphertext for a message.
`receive` waits, bounded by the job's timeout, for the inbox file the messenger placed after verifying and opening
the sealed message; inbox files stay until the job ends, so a replay reads them again.
"""
from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable

import numpy as np

from services.worker.job_spec import JobSpec
from services.worker.keys import WorkerKeys
from services.worker.sealing import MessageAddress, SealedMessage
from services.worker.spool import MESSAGE_NAME_PATTERN, Spool, atomic_writer

from services.mpc import TransportTimeout

log = logging.getLogger(__name__)
_POLL_MIN, _POLL_MAX = 0.002, 0.05


class SpoolTransportTimeout(TransportTimeout):
    """A message did not arrive within the job's bound; the message says which, from whom, and any rejections."""


class JobInterrupted(Exception):
    """The runner must stop waiting: the program is stopping, or the coordinator ended the job."""


def wire_name(from_seat: str, engine_name: str) -> str:
    """The broker/inbox name of an engine message: the sender's seat, a dot, the engine's name.

    An engine name outside the broker's character set (e.g. `lr/x-rows`) becomes a readable form plus a digest of
    the original (`x_owner.lr-x-rows.h<20 hex>`), the same at both ends and distinct for distinct names.
    """
    candidate = f"{from_seat}.{engine_name}"
    if MESSAGE_NAME_PATTERN.fullmatch(candidate):
        return candidate
    readable = re.sub(r"[^A-Za-z0-9_-]+", "-", engine_name).strip("-")[:80]
    digest = hashlib.sha256(engine_name.encode()).hexdigest()[:20]
    return f"{from_seat}.{readable}.h{digest}" if readable else f"{from_seat}.h{digest}"


def _npy_pieces(array: np.ndarray) -> list[bytes | memoryview]:
    import io

    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise TypeError("object arrays cannot be sent; the engine sends numeric arrays only")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return [header.getvalue(), memoryview(array.reshape(-1).view(np.uint8))]


class SpoolTransport:
    """Transport (CONTRACTS.md) of this worker's party in one job, over the spool."""

    def __init__(
        self,
        spool: Spool,
        spec: JobSpec,
        keys: WorkerKeys,
        timeout: float | None = None,
        interrupted: Callable[[], str | None] = lambda: None,
    ) -> None:
        """`interrupted()` returns a reason to stop waiting (program stopping, job ended), or None."""
        self.spool = spool
        self.spec = spec
        self.keys = keys
        self.party = spec.index
        self.timeout = spec.timeout if timeout is None else timeout
        self.interrupted = interrupted
        self.bytes_sent = 0
        self.messages_sent = 0
        self.messages_received = 0

    def send(self, to: int, name: str, array: np.ndarray) -> None:
        """Seal `array` for party `to` into the outbox (once: a name already written is left as it is)."""
        to_seat = self.spec.seat_of(to)
        if to == self.party:
            raise ValueError("a party cannot send to itself")
        wire = wire_name(self.spec.seat, name)
        if self.spool.outbox_has(self.spec.id, to_seat, wire):
            return  # written before a restart: the same run produces the same array, keep the first ciphertext
        address = MessageAddress(self.spec.id, self.spec.seat, to_seat, wire)
        with atomic_writer(self.spool.outbox_path(self.spec.id, to_seat, wire), overwrite=False) as out:
            size = SealedMessage.seal(
                _npy_pieces(array), out, address, self.spec.parties[to_seat].encryption_key, self.keys.signing
            )
        self.bytes_sent += size
        self.messages_sent += 1

    def receive(self, frm: int, name: str) -> np.ndarray:
        """Wait for message `name` from party `frm` and return its array."""
        from_seat = self.spec.seat_of(frm)
        wire = wire_name(from_seat, name)
        path = self.spool.inbox_path(self.spec.id, wire)
        deadline = time.monotonic() + self.timeout
        delay = _POLL_MIN
        while True:
            try:
                with open(path, "rb") as handle:
                    array = np.lib.format.read_array(handle, allow_pickle=False)
                self.messages_received += 1
                return array
            except FileNotFoundError:
                pass
            reason = self.interrupted()
            if reason:
                raise JobInterrupted(reason)
            if time.monotonic() >= deadline:
                raise SpoolTransportTimeout(self._timeout_message(from_seat, wire))
            time.sleep(delay)
            delay = min(_POLL_MAX, delay * 2)

    def _timeout_message(self, from_seat: str, wire: str) -> str:
        party = self.spec.parties[from_seat]
        text = (f"no message {wire!r} from the {from_seat} worker (organization {party.organization}) within "
                f"{self.timeout:g} s; check that worker is running and reaches the broker")
        rejected = [r for r in self.spool.rejections(self.spec.id).values() if r.get("from_seat") == from_seat]
        if rejected:
            text += (f"; {len(rejected)} message(s) claiming to come from {from_seat} were rejected "
                     f"({rejected[-1].get('reason')})")
        return text
