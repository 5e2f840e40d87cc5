"""End-to-end sealed messages between workers: encrypted to the recipient, signed by the sender, streamed.

Format (version 1), all integers big-endian:

    b"CAPESM01"                  magic
    u16 n, n bytes               HPKE (RFC 9180 base mode, X25519 / HKDF-SHA256 / ChaCha20Poly1305) single-shot
                                 encryption of a fresh 32-byte content key, with info = the binding below
    64 bytes                     Ed25519 signature by the sender over "cape-sealed-signature-v1" || binding || HPKE blob
    chunks: u32 n, n bytes       AES-256-GCM under the content key; nonce = chunk index (11 bytes) || final flag
                                 (1 byte); associated data = the binding

The binding encodes (job id, sender seat, recipient seat, message name), so a message cannot be replayed into
another job, slot or direction; the signature over the key's encapsulation ties the content key to the sender; the
index and final flag in each nonce stop chunks being reordered, dropped or cut off after any chunk. Plaintext is
processed one chunk at a time (1 MiB by default), so memory stays bounded whatever the message size.

`open` writes plaintext to its output as chunks verify; a message is good only if `open` returns, so callers write
to a temporary file and move it into place afterwards (the spool's atomic writer does exactly that).
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

MAGIC = b"CAPESM01"
CHUNK_SIZE = 1 << 20
_TAG = 16
_SIG = 64
_MAX_KEY_BLOB = 1024
_SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.CHACHA20_POLY1305)
_SIGNATURE_CONTEXT = b"cape-sealed-signature-v1"

Buffer = bytes | bytearray | memoryview


class MessageRejected(Exception):
    """A received message failed verification; it must be dropped, never used. The message holds no secret."""


@dataclass(frozen=True)
class MessageAddress:
    """What a sealed message is bound to: the job, the sender's and recipient's seats and the message name."""

    job_id: str
    from_seat: str
    to_seat: str
    name: str

    def binding(self) -> bytes:
        """Unambiguous encoding (length-prefixed fields) used as HPKE info, AEAD associated data and signed data."""
        out = bytearray(b"cape-sealed-message-v1")
        for field in (self.job_id, self.from_seat, self.to_seat, self.name):
            raw = field.encode()
            out += struct.pack(">H", len(raw)) + raw
        return bytes(out)


def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def fixed_chunks(pieces: Iterable[Buffer], size: int = CHUNK_SIZE) -> Iterator[Buffer]:
    """Re-cut byte pieces of any sizes into chunks of exactly `size` bytes (the last may be shorter).

    Full-size slices of large pieces are yielded as memoryviews without copying.
    """
    buffer = bytearray()
    for piece in pieces:
        view = memoryview(piece).cast("B")
        while len(view):
            if not buffer and len(view) >= size:
                yield view[:size]
                view = view[size:]
                continue
            take = min(size - len(buffer), len(view))
            buffer += view[:take]
            view = view[take:]
            if len(buffer) == size:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)


def file_pieces(handle: IO[bytes], size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Read an open binary file in pieces of `size` bytes."""
    while piece := handle.read(size):
        yield piece


class SealedMessage:
    """Seal (encrypt + sign) and open (verify + decrypt) messages between two workers' seats."""

    @staticmethod
    def seal(
        pieces: Iterable[Buffer],
        out: IO[bytes],
        address: MessageAddress,
        recipient: x25519.X25519PublicKey,
        sender: ed25519.Ed25519PrivateKey,
        chunk_size: int = CHUNK_SIZE,
    ) -> int:
        """Write the sealed form of the plaintext `pieces` to `out`; returns the number of bytes written."""
        binding = address.binding()
        content_key = AESGCM.generate_key(256)
        key_blob = _SUITE.encrypt(content_key, recipient, info=binding)
        signature = sender.sign(_SIGNATURE_CONTEXT + binding + key_blob)
        written = out.write(MAGIC + struct.pack(">H", len(key_blob)) + key_blob + signature)
        cipher = AESGCM(content_key)

        index = 0
        pending: Buffer | None = None
        sealed = bytearray(chunk_size + _TAG)  # one buffer for every chunk: fresh memory is what costs most
        for chunk in fixed_chunks(pieces, chunk_size):
            if pending is not None:
                written += _write_chunk(out, cipher, index, pending, False, binding, sealed)
                index += 1
            pending = chunk
        written += _write_chunk(out, cipher, index, pending if pending is not None else b"", True, binding, sealed)
        return written

    @staticmethod
    def open(
        source: IO[bytes],
        out: IO[bytes],
        address: MessageAddress,
        recipient: x25519.X25519PrivateKey,
        sender: ed25519.Ed25519PublicKey,
        max_chunk: int = CHUNK_SIZE,
    ) -> int:
        """Verify and decrypt `source` into `out`; returns the plaintext size or raises `MessageRejected`."""
        binding = address.binding()
        if _read_exact(source, len(MAGIC)) != MAGIC:
            raise MessageRejected("not a sealed message (unknown format)")
        (blob_len,) = struct.unpack(">H", _read_exact(source, 2))
        if not 0 < blob_len <= _MAX_KEY_BLOB:
            raise MessageRejected("malformed header")
        key_blob = _read_exact(source, blob_len)
        signature = _read_exact(source, _SIG)
        try:
            sender.verify(signature, _SIGNATURE_CONTEXT + binding + key_blob)
        except InvalidSignature:
            raise MessageRejected(
                "signature does not verify: not from the expected sender, or bound to another job, seat or name"
            ) from None
        try:
            content_key = _SUITE.decrypt(key_blob, recipient, info=binding)
        except (InvalidTag, ValueError):
            raise MessageRejected("cannot decrypt: not encrypted to this worker's key") from None
        cipher = AESGCM(content_key)

        size = 0
        index = 0
        sealed = memoryview(bytearray(max_chunk + _TAG))  # reused for every chunk, as in `seal`
        plain = memoryview(bytearray(max_chunk))
        while True:
            (length,) = struct.unpack(">I", _read_exact(source, 4))
            if not _TAG <= length <= max_chunk + _TAG:
                raise MessageRejected(f"chunk {index} has an impossible length")
            _read_into(source, sealed[:length])
            opened = plain[: length - _TAG]
            final = _open_chunk(cipher, index, sealed[:length], binding, opened)
            out.write(opened)
            size += len(opened)
            if final:
                break
            index += 1
        if source.read(1):
            raise MessageRejected("data after the final chunk")
        return size

    @staticmethod
    def seal_bytes(
        plaintext: bytes, address: MessageAddress, recipient: x25519.X25519PublicKey,
        sender: ed25519.Ed25519PrivateKey,
    ) -> bytes:
        """Seal a small message held in memory."""
        import io

        out = io.BytesIO()
        SealedMessage.seal([plaintext], out, address, recipient, sender)
        return out.getvalue()

    @staticmethod
    def open_bytes(
        sealed: bytes, address: MessageAddress, recipient: x25519.X25519PrivateKey,
        sender: ed25519.Ed25519PublicKey,
    ) -> bytes:
        """Open a small sealed message held in memory."""
        import io

        out = io.BytesIO()
        SealedMessage.open(io.BytesIO(sealed), out, address, recipient, sender)
        return out.getvalue()


def _write_chunk(out: IO[bytes], cipher: AESGCM, index: int, plain: Buffer, final: bool, ad: bytes,
                 buffer: bytearray) -> int:
    length = len(plain) + _TAG
    sealed = memoryview(buffer)[:length]
    cipher.encrypt_into(_nonce(index, final), plain, ad, sealed)
    out.write(struct.pack(">I", length))
    out.write(sealed)  # a file copies it before returning, so the buffer can be reused
    return 4 + length


def _open_chunk(cipher: AESGCM, index: int, sealed: memoryview, ad: bytes, plain: memoryview) -> bool:
    """Decrypt one chunk into `plain`; returns its final flag."""
    # The final flag is not sent in the clear: try "not final" first (all chunks but one), then "final".
    for final in (False, True):
        try:
            cipher.decrypt_into(_nonce(index, final), sealed, ad, plain)
            return final
        except InvalidTag:
            continue
    raise MessageRejected(f"chunk {index} fails authentication (altered, reordered or from another message)")


def _read_into(source: IO[bytes], target: memoryview) -> None:
    """Fill `target` from `source` (which may return short reads before the end) or raise `MessageRejected`."""
    readinto = getattr(source, "readinto", None)
    done = 0
    while done < len(target):
        if readinto is not None:
            got = readinto(target[done:])
        else:
            data = source.read(len(target) - done)
            got = len(data)
            target[done : done + got] = data
        if not got:
            raise MessageRejected("truncated message")
        done += got


def _read_exact(source: IO[bytes], count: int) -> bytes:
    """Exactly `count` bytes (the small header fields), or `MessageRejected`."""
    data = bytearray(count)
    _read_into(source, memoryview(data))
    return bytes(data)
