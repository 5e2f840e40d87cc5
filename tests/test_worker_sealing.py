"""Sealed messages: only the addressed worker opens them, only from the expected sender, in one piece."""
from __future__ import annotations

import hashlib
import io
import os
import threading
import tracemalloc

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from services.worker.sealing import CHUNK_SIZE, MessageAddress, MessageRejected, SealedMessage, file_pieces

ADDRESS = MessageAddress("job1", "x_owner", "y_owner", "x_owner.round1")


@pytest.fixture(scope="module")
def parties():
    return {
        "recipient": x25519.X25519PrivateKey.generate(),
        "sender": ed25519.Ed25519PrivateKey.generate(),
        "other_x": x25519.X25519PrivateKey.generate(),
        "other_ed": ed25519.Ed25519PrivateKey.generate(),
    }


def seal(parties, plaintext, address=ADDRESS, chunk_size=CHUNK_SIZE):
    out = io.BytesIO()
    SealedMessage.seal([plaintext], out, address, parties["recipient"].public_key(), parties["sender"], chunk_size)
    return out.getvalue()


def open_(parties, sealed, address=ADDRESS, recipient=None, sender=None, max_chunk=CHUNK_SIZE):
    out = io.BytesIO()
    SealedMessage.open(io.BytesIO(sealed), out, address, recipient or parties["recipient"],
                       sender or parties["sender"].public_key(), max_chunk)
    return out.getvalue()


@pytest.mark.parametrize("size", [0, 1, 1000, 4096, 4097, 3 * 4096])
def test_roundtrip_across_chunk_boundaries(parties, size):
    plaintext = os.urandom(size)
    sealed = seal(parties, plaintext, chunk_size=4096)
    assert open_(parties, sealed, max_chunk=4096) == plaintext
    assert len(plaintext) < 32 or plaintext[:32] not in sealed


class _Trickle(io.RawIOBase):
    """A stream (like a socket) that returns at most 700 bytes per call, with or without `readinto`."""

    def __init__(self, data: bytes, readinto: bool) -> None:
        self._data = memoryview(data)
        if not readinto:
            self.readinto = None  # type: ignore[assignment]

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = 700 if size < 0 else min(size, 700)
        piece, self._data = bytes(self._data[:size]), self._data[size:]
        return piece

    def readinto(self, buffer) -> int:  # type: ignore[override]
        piece = self.read(len(buffer))
        buffer[: len(piece)] = piece
        return len(piece)


@pytest.mark.parametrize("readinto", [True, False])
def test_opens_from_a_stream_that_returns_short_reads(parties, readinto):
    plaintext = os.urandom(10_000)
    sealed = seal(parties, plaintext, chunk_size=4096)
    out = io.BytesIO()
    SealedMessage.open(_Trickle(sealed, readinto), out, ADDRESS, parties["recipient"],
                       parties["sender"].public_key(), 4096)
    assert out.getvalue() == plaintext
    with pytest.raises(MessageRejected, match="truncated"):
        SealedMessage.open(_Trickle(sealed[:-5], readinto), io.BytesIO(), ADDRESS, parties["recipient"],
                           parties["sender"].public_key(), 4096)


def test_ciphertext_hides_the_plaintext(parties):
    plaintext = b"share:" + b"\x07" * 5000
    sealed = seal(parties, plaintext)
    assert b"\x07" * 32 not in sealed


def test_every_flipped_byte_is_rejected(parties):
    sealed = seal(parties, os.urandom(3000), chunk_size=1024)
    # every byte of the header, signature and the first chunk, and a sample of the rest
    positions = list(range(0, 300)) + list(range(300, len(sealed), 97)) + [len(sealed) - 1]
    for pos in positions:
        tampered = bytearray(sealed)
        tampered[pos] ^= 0x01
        with pytest.raises(MessageRejected):
            open_(parties, bytes(tampered), max_chunk=1024)


def test_wrong_recipient_key_is_rejected(parties):
    sealed = seal(parties, b"for y_owner only")
    with pytest.raises(MessageRejected, match="not encrypted to this worker"):
        open_(parties, sealed, recipient=parties["other_x"])


def test_wrong_sender_is_rejected(parties):
    sealed = seal(parties, b"hello")
    with pytest.raises(MessageRejected, match="not from the expected sender"):
        open_(parties, sealed, sender=parties["other_ed"].public_key())


@pytest.mark.parametrize("field, value", [
    ("job_id", "job2"), ("from_seat", "helper"), ("to_seat", "helper"), ("name", "x_owner.round2"),
])
def test_each_bound_field_is_checked(parties, field, value):
    sealed = seal(parties, b"share")
    other = MessageAddress(**{**ADDRESS.__dict__, field: value})
    with pytest.raises(MessageRejected, match="bound to another job, seat or name"):
        open_(parties, sealed, address=other)


def test_truncation_at_a_chunk_boundary_is_rejected(parties):
    sealed = seal(parties, os.urandom(4 * 1024), chunk_size=1024)
    header = 8 + 2 + 80 + 64
    one_chunk = 4 + 1024 + 16
    for keep in (header, header + one_chunk, header + 3 * one_chunk, len(sealed) - 1):
        with pytest.raises(MessageRejected, match="truncated"):
            open_(parties, sealed[:keep], max_chunk=1024)


def test_reordered_chunks_and_trailing_data_are_rejected(parties):
    sealed = seal(parties, os.urandom(3 * 1024), chunk_size=1024)
    header, one_chunk = 8 + 2 + 80 + 64, 4 + 1024 + 16
    c0 = sealed[header:header + one_chunk]
    c1 = sealed[header + one_chunk:header + 2 * one_chunk]
    swapped = sealed[:header] + c1 + c0 + sealed[header + 2 * one_chunk:]
    with pytest.raises(MessageRejected, match="chunk 0 fails authentication"):
        open_(parties, swapped, max_chunk=1024)
    with pytest.raises(MessageRejected, match="after the final chunk"):
        open_(parties, sealed + b"\x00", max_chunk=1024)


def test_chunks_cannot_be_moved_between_messages(parties):
    a = seal(parties, b"a" * 2048, chunk_size=1024)
    b = seal(parties, b"b" * 2048, chunk_size=1024)
    header = 8 + 2 + 80 + 64
    spliced = a[:header] + b[header:]
    with pytest.raises(MessageRejected, match="fails authentication"):
        open_(parties, spliced, max_chunk=1024)


def test_not_a_sealed_message(parties):
    with pytest.raises(MessageRejected, match="not a sealed message"):
        open_(parties, b"GET / HTTP/1.1\r\n")


def test_200_mb_stream_with_bounded_memory(parties):
    """200 MB go through a pipe (never whole anywhere) and arrive intact; Python-side peak stays a few chunks."""
    total = 200 * 1024 * 1024
    block = os.urandom(CHUNK_SIZE)
    read_fd, write_fd = os.pipe()
    expected = hashlib.sha256()
    got = hashlib.sha256()

    class HashSink(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            got.update(data)
            return len(data)

    def pieces():
        for i in range(total // CHUNK_SIZE):
            piece = i.to_bytes(8, "big") + block[8:]
            expected.update(piece)
            yield piece

    errors = []

    def producer():
        try:
            with os.fdopen(write_fd, "wb") as out:
                SealedMessage.seal(pieces(), out, ADDRESS, parties["recipient"].public_key(), parties["sender"])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    tracemalloc.start()
    try:
        thread = threading.Thread(target=producer)
        thread.start()
        with os.fdopen(read_fd, "rb") as source:
            size = SealedMessage.open(source, HashSink(), ADDRESS, parties["recipient"], parties["sender"].public_key())
        thread.join(timeout=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not errors
    assert size == total
    assert got.hexdigest() == expected.hexdigest()
    assert peak < 16 * CHUNK_SIZE, f"peak Python memory {peak / 2**20:.1f} MiB for a 200 MiB message"


def test_file_pieces_reads_a_file_in_chunks(tmp_path, parties):
    data = os.urandom(10_000)
    (tmp_path / "p").write_bytes(data)
    out = io.BytesIO()
    with open(tmp_path / "p", "rb") as handle:
        SealedMessage.seal(file_pieces(handle, 1000), out, ADDRESS, parties["recipient"].public_key(),
                           parties["sender"], chunk_size=4096)
    assert open_(parties, out.getvalue(), max_chunk=4096) == data
