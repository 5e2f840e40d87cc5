"""Loading a data owner's columns from CSV or Parquet into float64 arrays.

Sources: a local path, a `file://` uri, or an open binary file object (the appliance passes an S3 stream).
The format is taken from the file's first bytes (Parquet starts with `PAR1`), so a file's extension may lie; a CSV
file compressed whole with gzip, bzip2, zstd or xz is read through its decompression (a zip archive is not).
Reading uses pyarrow (multi-threaded, ~1 s per 10^6 rows × 8 columns); when a value does not parse, a slower
second pass over the text finds the first bad row so the message can name it. Rows count from 1, header not counted.
"""
from __future__ import annotations

import io
import lzma
import mmap
import re
import os
import sys
import weakref
import zlib
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .errors import (
    MissingColumnError,
    MissingFileError,
    NonFiniteError,
    NonNumericError,
    UnreadableDataError,
)

Source = Union[str, os.PathLike, BinaryIO]
Column = list[np.ndarray]  # a column's values as arrow gave them: one float64 array per chunk, in row order

_PARQUET_MAGIC = b"PAR1"
# Compressed files by their first bytes (none can start a text header: bzip2's is "BZh", a digit, then "1AY&SY").
_COMPRESSED = ((re.compile(rb"\x1f\x8b"), "gzip"), (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd"),
               (re.compile(rb"BZh[1-9]1AY&SY"), "bzip2"), (re.compile(rb"\xfd7zXZ\x00"), "xz"),
               (re.compile(rb"PK\x03\x04"), "zip"))
_ARROW_CODECS = {"gzip": "gzip", "bzip2": "bz2", "zstd": "zstd"}  # xz: arrow has no codec, the standard library has
# The header must lie within this many bytes: a bound on what a bad file can make us buffer.
_MAX_HEADER_BYTES = 16 * 1024 * 1024


@dataclass
class _Opened:
    """An open source: its display name, its format, and a binary stream positioned at the start."""

    name: str
    kind: str  # "csv" or "parquet"
    stream: BinaryIO
    head: bytes  # the first bytes (decompressed), through the first newline (the CSV header) when there is one
    restart: Callable[[], BinaryIO] | None  # a fresh stream from the start, for a diagnostic second pass, if it can


def source_name(source: Source, name: str | None = None) -> str:
    """Return the name used for `source` in messages."""
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return str(getattr(source, "name", None) or "<stream>")


def local_path(source: str | os.PathLike) -> str:
    """Return the local file path of a path or `file://` uri; other uri schemes are refused."""
    text = os.fspath(source)
    if "://" not in text:
        return text
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme != "file":
        raise UnreadableDataError(
            text, f"cannot read {parsed.scheme}:// here; use a local path, a file:// uri, or an open file"
        )
    if parsed.netloc not in ("", "localhost"):
        raise UnreadableDataError(text, "a file:// uri must name a local file (file:///absolute/path)")
    return urllib.request.url2pathname(parsed.path)


class _PrefixedStream(io.RawIOBase):
    """A read-only stream that yields already-read `prefix` bytes, then the rest of `rest`."""

    def __init__(self, prefix: bytes, rest: BinaryIO) -> None:
        self._prefix = memoryview(prefix)
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _WithoutTrailingBlankLines(io.RawIOBase):
    """A read-only stream: `inner` with the run of line breaks at its very end cut to one. A blank line at the end
    of a CSV file (an editor's, `echo >>`) is no row; one before other rows is (a missing value, in a one-column
    file), which the loader reports."""

    _CHUNK = 1 << 20

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner
        self._held = b""  # line breaks read at the end of the data so far: emitted once more data follows
        self._out = memoryview(b"")  # read and not yet handed out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while not self._out:
            chunk = self._inner.read(self._CHUNK)
            if not chunk:
                self._out = memoryview(_first_line_break(self._held))
                self._held = b""
                break
            data = self._held + chunk if self._held else chunk
            body = data.rstrip(b"\r\n")
            self._held = data[len(body):]
            self._out = memoryview(body)
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


def _first_line_break(breaks: bytes) -> bytes:
    return breaks[:2] if breaks.startswith(b"\r\n") else breaks[:1]


def _csv_stream(opened: _Opened) -> BinaryIO:
    return io.BufferedReader(_WithoutTrailingBlankLines(opened.stream))  # type: ignore[arg-type]


@contextmanager
def _open(source: Source, name: str | None) -> Iterator[_Opened]:
    """Open `source` and detect its format (and compression) from its first bytes."""
    display = source_name(source, name)
    if not isinstance(source, (str, os.PathLike)):
        yield _opened(display, source)
        return
    path = local_path(source)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise MissingFileError(display) from None
    except IsADirectoryError:
        raise MissingFileError(display, "is a directory, not a file") from None
    except PermissionError:
        raise MissingFileError(display, "permission denied") from None
    except OSError as exc:
        raise MissingFileError(display, exc.strerror or "cannot be opened") from None
    with handle:
        yield _opened(display, handle)


def _opened(display: str, raw: BinaryIO) -> _Opened:
    """`raw` with its format found: a stream of its (decompressed) bytes from the start, and how to start again."""
    seekable = bool(getattr(raw, "seekable", lambda: False)())
    start = raw.tell() if seekable else 0
    head = _read_head(raw)
    compression = _compression(display, head)

    def from_start() -> BinaryIO:
        raw.seek(start)
        return raw if compression is None else _decompressed(raw, compression, display)

    restart = from_start if seekable else None
    if seekable:
        stream = from_start()
    else:
        stream = io.BufferedReader(_PrefixedStream(head, raw))  # type: ignore[arg-type]
        if compression is not None:
            stream = _decompressed(stream, compression, display)
    if compression is not None:
        head = _read_head(stream)
        stream = io.BufferedReader(_PrefixedStream(head, stream))  # type: ignore[arg-type]
    return _Opened(display, _kind(display, head, compression), stream, head, restart)


def decompressed(raw: io.BufferedReader, *, name: str) -> BinaryIO:
    """`raw`'s bytes from where it stands, decompressed if they are a gzip, bzip2, zstd or xz file (as the loaders
    read them); a zip archive is refused. A damaged or cut file raises `UnreadableDataError` as it is read."""
    compression = _compression(name, raw.peek(16)[:16])
    return raw if compression is None else _decompressed(raw, compression, name)


def _decompressed(raw: BinaryIO, compression: str, display: str) -> BinaryIO:
    return io.BufferedReader(_Decompressing(raw, compression, display))  # type: ignore[arg-type]


class _Decompressing(io.RawIOBase):
    """`raw`'s bytes decompressed: gzip, bzip2 and zstd by arrow, xz by the standard library. A damaged or cut
    file is an `UnreadableDataError` (read on, it would be fewer rows or garbage)."""

    def __init__(self, raw: BinaryIO, compression: str, display: str) -> None:
        unclosed = _PrefixedStream(b"", raw)  # arrow closes the file it reads when its stream goes; `raw` is not ours
        self._inner = (lzma.LZMAFile(unclosed) if compression == "xz"
                       else pa.CompressedInputStream(unclosed, _ARROW_CODECS[compression]))
        self._compression = compression
        self._display = display

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        try:
            data = self._inner.read(len(buffer))
        except (OSError, EOFError, lzma.LZMAError) as exc:
            raise UnreadableDataError(self._display, f"the {self._compression}-compressed file is damaged or cut "
                                                     f"short ({_arrow_reason(exc)})") from None
        buffer[: len(data)] = data
        return len(data)


def _read_head(stream: BinaryIO) -> bytes:
    """Read the first bytes of a stream, through the first newline (bounded), for format and header detection."""
    head = stream.read(65536) or b""
    while b"\n" not in head and len(head) < _MAX_HEADER_BYTES:
        chunk = stream.read(65536)
        if not chunk:
            break
        head += chunk
    return head


def _compression(display: str, head: bytes) -> str | None:
    """The compression of a file that starts with `head` (None: not compressed)."""
    for magic, compression in _COMPRESSED:
        if magic.match(head):
            if compression == "zip":  # an archive of files, not one file's bytes
                raise UnreadableDataError(display, "the file is a zip archive; give the CSV or Parquet file inside it")
            return compression
    return None


def _kind(display: str, head: bytes, compression: str | None = None) -> str:
    if not head:
        raise UnreadableDataError(display, "the file is empty; expected a CSV file with a header row, or Parquet")
    if head[:4] == _PARQUET_MAGIC:
        if compression is not None:  # Parquet needs to seek to its end: it would be decompressed whole into memory
            raise UnreadableDataError(display, f"the file is a {compression}-compressed Parquet file; give the "
                                               "Parquet file itself (it compresses its columns inside)")
        return "parquet"
    if display.lower().endswith((".parquet", ".pq")):  # read as CSV, it would fail in words about rows and columns
        raise UnreadableDataError(display, "the name says Parquet, but the file does not start as Parquet files do "
                                           "(PAR1); give a Parquet file, or a CSV file")
    return "csv"


def read_columns(source: Source, *, name: str | None = None) -> list[str]:
    """Return the column names of a CSV (its header row, each name trimmed of surrounding spaces, as a dataview's
    schema names them and as the loader finds them) or Parquet file (exact), in file order."""
    with _open(source, name) as opened:
        if opened.kind == "parquet":
            return list(_parquet_file(opened).schema_arrow.names)
        return [column.strip() for column in _csv_header(opened.name, opened.head)]


def check_ends(name: str, columns: Sequence[str], head: bytes, read_tail: Callable[[int], bytes]) -> None:
    """Raise the loaders' own error when a file's first bytes (`head`) and, for Parquet, its footer (`read_tail(n)`:
    the file's last n bytes, or all of a shorter file) already show it unusable for `columns`: empty, an archive, a
    compressed Parquet file, a header or schema without one of them. Quiet when only more of the file can tell (a CSV
    header longer than `head`, or a bzip2 block longer than `head`: see `head_size`): the loaders check again. A
    large remote file need not be fetched whole to fail."""
    compression = _compression(name, head)
    if compression is not None:
        head = _start_of(compression, head)
        if not head:
            return
    if _kind(name, head, compression) == "csv":
        if b"\n" in head:
            _csv_names(name, list(columns), _csv_header(name, head))
        return
    end = read_tail(8)
    if len(end) < 8 or end[4:] != _PARQUET_MAGIC:
        raise UnreadableDataError(name, "not a readable Parquet file (it does not end as Parquet files do: cut short?)")
    footer = read_tail(int.from_bytes(end[:4], "little") + 8)
    try:  # the footer behind the magic: where a Parquet reader looks for it (offsets past it are not followed)
        available = pq.ParquetFile(pa.BufferReader(_PARQUET_MAGIC + footer)).schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        raise UnreadableDataError(name, f"not a readable Parquet file ({_arrow_reason(exc)})") from None
    _require_columns(name, list(columns), list(available))


def _start_of(compression: str, head: bytes) -> bytes:
    """What the first bytes of a compressed file decompress to, as far as they go (b"" when that cannot be told
    from them: a bzip2 block cut short, or a damaged start, which the loader reports)."""
    decoders = {"gzip": lambda: zlib.decompressobj(wbits=31), "xz": lzma.LZMADecompressor}
    if compression not in decoders:
        return _arrow_start_of(compression, head)
    try:
        return decoders[compression]().decompress(head, _MAX_HEADER_BYTES)
    except (zlib.error, lzma.LZMAError, EOFError):
        return b""


def _arrow_start_of(compression: str, head: bytes) -> bytes:
    """As `_start_of`, through arrow's decoder: zstd gives what a cut frame holds so far, bzip2 each whole block."""
    stream = pa.CompressedInputStream(pa.BufferReader(head), _ARROW_CODECS[compression])
    start = b""
    try:  # in small reads: a read past what the cut stream holds raises, losing what it had decoded
        while b"\n" not in start and len(start) < _MAX_HEADER_BYTES:
            chunk = stream.read(65536)
            if not chunk:
                break
            start += chunk
    except (pa.ArrowException, OSError):
        pass
    return start


def head_size(first: bytes, default: int) -> int:
    """How many of a file's first bytes `check_ends` needs to see a CSV header, from its first bytes: `default`,
    or for bzip2 its whole first block (up to the level's 100 kB units, a little more when the data does not
    compress): bzip2 decodes no part of a block before its end."""
    level = re.match(rb"BZh([1-9])1AY&SY", first)
    return max(default, int(level[1]) * 101_000 + 4096) if level else default


def _populated_empty(shape: tuple[int, int]) -> np.ndarray:
    """An uninitialized column-major (Fortran-order) float64 array whose pages the kernel maps in one call.

    Filling a fresh np.empty of a few hundred MB page-faults once per page: measured here at 0.05 s or 0.9 s for
    256 MB, depending on whether huge pages were at hand; a populated mapping (MAP_POPULATE) took 0.15 s every time.
    """
    rows, cols = shape
    size = rows * cols * 8
    flags = getattr(mmap, "MAP_POPULATE", None)
    if size < (64 << 20) or flags is None:
        return np.empty(shape, dtype=np.float64, order="F")
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
    return np.frombuffer(mapping, dtype=np.float64).reshape(cols, rows).T  # the array keeps the mapping alive


def load_x(source: Source, columns: Sequence[str], *, name: str | None = None) -> np.ndarray:
    """Load `columns` (in that order) as an n×d column-major float64 array; raise a `JobDataError` if unusable.

    Parquet is read one column at a time, each copied into x and released before the next: arrow's buffers for
    one column are reused for the next instead of the whole table being decoded into fresh memory first (on a
    VM, fresh pages are what a large load mostly costs). Column-major keeps every copy contiguous.
    """
    columns = list(columns)
    x: np.ndarray | None = None
    with _open(source, name) as opened:
        for j, chunks in enumerate(_finite_columns(opened, columns)):
            if x is None:
                x = _populated_empty((sum(len(chunk) for chunk in chunks), len(columns)))
            offset = 0
            for chunk in chunks:
                x[offset : offset + len(chunk), j] = chunk
                offset += len(chunk)
    return x if x is not None else np.empty((0, 0), order="F")


def load_y(source: Source, column: str, *, name: str | None = None) -> np.ndarray:
    """Load one column as a float64 vector of shape (n,); raise a `JobDataError` if unusable."""
    chunks = _load(source, [column], name)[0]
    if len(chunks) != 1:
        return np.concatenate(chunks) if chunks else np.empty(0)
    y = chunks[0]
    return y if y.flags.writeable else y.copy()  # arrow's zero-copy buffers are read-only


def _load(source: Source, columns: list[str], name: str | None) -> list[Column]:
    with _open(source, name) as opened:
        return list(_finite_columns(opened, columns))


def _finite_columns(opened: _Opened, columns: list[str]) -> Iterator[Column]:
    """The asked-for columns as float64 chunks, in order (Parquet reads each only when it is asked for); once all
    were read, `NonFiniteError` for the earliest row holding NaN or ±inf (ties: the first column asked for)."""
    reader = _read_parquet if opened.kind == "parquet" else _read_csv
    first: tuple[int, int, float] | None = None  # (row, column index, value)
    for j, chunks in enumerate(reader(opened, columns)):
        offset = 0
        for chunk in chunks:
            if first is not None and offset >= first[0]:
                break
            bad = ~np.isfinite(chunk)
            if bad.any():
                at = int(np.argmax(bad))
                if first is None or offset + at < first[0]:
                    first = (offset + at, j, float(chunk[at]))
                break
            offset += len(chunk)
        yield chunks
    if first is not None:
        row, j, value = first
        raise NonFiniteError(opened.name, columns[j], row + 1, value)


# --- Parquet -------------------------------------------------------------------------------------------------


def _parquet_file(opened: _Opened) -> pq.ParquetFile:
    stream = opened.stream
    if opened.restart is None:
        # Parquet keeps its schema at the end of the file: a one-way stream must be held whole.
        stream = pa.BufferReader(stream.read())  # type: ignore[assignment]
    try:
        return pq.ParquetFile(stream)
    except (pa.ArrowException, OSError) as exc:
        raise UnreadableDataError(opened.name, f"not a readable Parquet file ({_arrow_reason(exc)})") from None


def _read_parquet(opened: _Opened, columns: list[str]) -> Iterator[Column]:
    parquet = _parquet_file(opened)
    available = list(parquet.schema_arrow.names)
    _require_columns(opened.name, columns, available)
    for column in columns:
        try:
            table = parquet.read(columns=[column])
        except (pa.ArrowException, OSError) as exc:
            raise UnreadableDataError(opened.name, f"not a readable Parquet file ({_arrow_reason(exc)})") from None
        yield _to_float(opened.name, column, table.column(0))
        del table


# --- CSV -----------------------------------------------------------------------------------------------------


def _csv_header(display: str, head: bytes) -> list[str]:
    """Parse the header row from the file's first bytes (`head`, through the first newline)."""
    first_line = head.split(b"\n", 1)[0]
    try:
        table = pacsv.read_csv(io.BytesIO(first_line + b"\n"), read_options=pacsv.ReadOptions(use_threads=False))
        names = list(table.column_names)
    except pa.ArrowException as exc:
        raise UnreadableDataError(display, f"cannot read the CSV header row ({_arrow_reason(exc)})") from None
    except UnicodeDecodeError:
        # Arrow's message would quote the offending bytes: data, which may not travel into a job's error.
        raise UnreadableDataError(display, "not a CSV file with a UTF-8 header row, nor a Parquet file") from None
    return names


def _csv_names(display: str, columns: list[str], header: list[str]) -> list[str]:
    """The header's name of each asked-for column: the same name or, failing that, the one that is that name once
    its surrounding spaces are trimmed. `age, income` is a common hand-written header, and a dataview's schema
    read from such a header (`cape dataviews add --schema-from-file`) names the column `income`."""
    names = []
    for column in columns:
        trimmed = [name for name in header if name.strip() == column]
        if header.count(column) > 1:
            raise _named_twice(display, column, header.count(column))
        if column in header:
            names.append(column)
        elif len(trimmed) == 1:
            names.append(trimmed[0])
        elif trimmed:
            raise UnreadableDataError(display, f"column {column!r} is named {len(trimmed)} times in the header "
                                               "(with different spaces around it)")
        else:
            raise MissingColumnError(display, column, header)
    return names


# An empty line before other rows is a row: in a one-column file it is how a missing value is written (pandas writes
# NaN so), and skipping it (pyarrow's default) shifts every later row, pairing x and y rows wrongly without an error.
# Blank lines at the very end are no rows (`_WithoutTrailingBlankLines`): a missing last value then shows as a row
# count that differs from the other owner's.
_PARSE = pacsv.ParseOptions(ignore_empty_lines=False)


def _read_csv(opened: _Opened, columns: list[str]) -> list[Column]:
    names = _csv_names(opened.name, columns, _csv_header(opened.name, opened.head))
    if opened.restart is not None:
        try:
            table = pacsv.read_csv(
                _csv_stream(opened),
                parse_options=_PARSE,
                convert_options=pacsv.ConvertOptions(
                    include_columns=names,
                    column_types={name: pa.float64() for name in names},
                    null_values=[""],
                    strings_can_be_null=True,
                ),
            )
        except pa.ArrowInvalid:
            opened.stream = opened.restart()  # a bad value or row: find it in a second, slower pass
        else:
            return [_to_float(opened.name, c, table.column(name)) for c, name in zip(columns, names)]
    return _read_csv_streaming(opened, columns, names)


# pyarrow decodes an invalid row's text before it calls the handler; a row that is not UTF-8 fails there, inside
# pyarrow, which reports it through sys.unraisablehook (a traceback on stderr, or in a worker's log) and takes the row
# as an error. The hook below keeps such failures of our handlers for the error message instead.
_UNDECODABLE_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # handler -> its list of failures


class _RowDecodeFailures:
    """The unraisable hook: a UnicodeDecodeError of one of our handlers is kept for it; the rest go on to the hook
    that was there before."""

    def __init__(self, previous: object) -> None:
        self.previous = previous

    def __call__(self, unraisable: "sys.UnraisableHookArgs") -> None:
        try:
            failures = _UNDECODABLE_ROWS.get(unraisable.object)
        except TypeError:  # not weakly referable: not one of ours
            failures = None
        if failures is not None and isinstance(unraisable.exc_value, UnicodeDecodeError):
            failures.append(unraisable.exc_value)
            return
        self.previous(unraisable)  # type: ignore[operator]


def _keep_row_decode_failures(handler: object) -> list[UnicodeDecodeError]:
    """The list that will hold `handler`'s row decode failures (the hook installed if it is not already)."""
    if not isinstance(sys.unraisablehook, _RowDecodeFailures):
        sys.unraisablehook = _RowDecodeFailures(sys.unraisablehook)
    _UNDECODABLE_ROWS[handler] = failures = []
    return failures


def _read_csv_streaming(opened: _Opened, columns: list[str], names: list[str]) -> list[Column]:
    """Read batch by batch as text, converting each batch, so the first bad row can be named exactly."""
    bad_rows: list[pacsv.InvalidRow] = []

    def on_invalid_row(row: pacsv.InvalidRow) -> str:
        bad_rows.append(row)
        return "error"

    undecodable = _keep_row_decode_failures(on_invalid_row)

    try:
        reader = pacsv.open_csv(
            _csv_stream(opened),
            read_options=pacsv.ReadOptions(use_threads=False),
            parse_options=pacsv.ParseOptions(ignore_empty_lines=False, invalid_row_handler=on_invalid_row),
            convert_options=pacsv.ConvertOptions(
                include_columns=names,
                column_types={name: pa.string() for name in names},
                strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        raise _csv_error(opened.name, exc, bad_rows, undecodable) from None
    parts: list[Column] = [[] for _ in columns]
    offset = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowInvalid as exc:
            raise _csv_error(opened.name, exc, bad_rows, undecodable) from None
        for j, (column, name) in enumerate(zip(columns, names)):
            parts[j].extend(_to_float(opened.name, column, batch.column(name), offset))
        offset += batch.num_rows
    return parts


def _csv_error(display: str, exc: Exception, bad_rows: list[pacsv.InvalidRow],
               undecodable: list[UnicodeDecodeError]) -> UnreadableDataError:
    """Describe a malformed CSV without echoing the row's contents (they are data)."""
    if undecodable or "invalid UTF8" in str(exc):
        return UnreadableDataError(display, "not UTF-8 text; save the CSV file as UTF-8 (or give a Parquet file)")
    if bad_rows:
        row = bad_rows[0]
        where = f"row {row.number - 1}" if row.number else "a row"
        return UnreadableDataError(
            display,
            f"{where} has {row.actual_columns} fields but the header has {row.expected_columns}; "
            "every row needs one value per column",
        )
    return UnreadableDataError(display, f"not a well-formed CSV file ({_arrow_reason(exc)})")


# --- shared --------------------------------------------------------------------------------------------------


def _require_columns(display: str, columns: list[str], available: list[str]) -> None:
    for column in columns:
        if column not in available:
            raise MissingColumnError(display, column, available)
        if available.count(column) > 1:
            raise _named_twice(display, column, available.count(column))


def _named_twice(display: str, column: str, times: int) -> UnreadableDataError:
    # Which of the same-named columns was meant cannot be known: reading the first would be a silent guess.
    return UnreadableDataError(display, f"column {column!r} is named {times} times in the file; give each column "
                                        "its own name")


def _to_float(display: str, column: str, values: pa.ChunkedArray | pa.Array, offset: int = 0) -> Column:
    """Convert an arrow column to float64; raise `NonNumericError` naming the first empty or unparsable row."""
    if values.null_count:
        row = int(np.argmax(pc.is_null(values).to_numpy(zero_copy_only=False)))
        raise NonNumericError(display, column, offset + row + 1, None)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        values = pc.utf8_trim_whitespace(values)
        try:
            converted = pc.cast(values, pa.float64())
        except pa.ArrowInvalid:
            row = _first_unparsable(values)
            raise NonNumericError(display, column, offset + row + 1, values[row].as_py()) from None
    else:
        # A type with no cast to float64 (dates, say) is named; the cast's own message can quote a value.
        try:
            converted = pc.cast(values, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise UnreadableDataError(
                display, f"column {column!r} holds {values.type} values, not numbers"
            ) from None
    if isinstance(converted, pa.Array):
        return [converted.to_numpy()]
    return [chunk.to_numpy() for chunk in converted.chunks]  # zero-copy views: no nulls, float64


def _first_unparsable(values: pa.ChunkedArray | pa.Array) -> int:
    """Index of the first string that does not cast to float64, by bisection with arrow's own parser."""
    lo, hi = 0, len(values)  # invariant: the first bad index lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(values.slice(lo, mid - lo), pa.float64())
        except pa.ArrowInvalid:
            hi = mid
        else:
            lo = mid
    return lo


def _arrow_reason(exc: Exception) -> str:
    """Arrow's first message line, cut after "got N" so no cell contents are repeated."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return re.sub(r"(got \d+).*", r"\1", text)[:200]
