"""Loading an owner's columns: CSV and Parquet, paths, file:// uris, file objects; every bad input's message."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.jobs.linear_regression import (
    JobDataError,
    MissingColumnError,
    MissingFileError,
    NonFiniteError,
    NonNumericError,
    UnreadableDataError,
    load_x,
    load_y,
    read_columns,
)


class OneWayStream(io.RawIOBase):
    """A stream that cannot seek, like the body of an S3 GET."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self._inner.read(min(len(buffer), 1000))  # short reads, as a network stream gives
        buffer[: len(chunk)] = chunk
        return len(chunk)


@pytest.fixture
def table() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"age": rng.uniform(18, 90, 50), "income": rng.lognormal(10, 1, 50), "tiny": rng.normal(0, 1e-4, 50)}


def write_csv(path: Path, columns: dict[str, np.ndarray]) -> Path:
    names = list(columns)
    lines = [",".join(names)] + [",".join(repr(float(columns[c][i])) for c in names) for i in range(len(columns[names[0]]))]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_columns_in_the_order_asked(tmp_path: Path, table) -> None:
    path = write_csv(tmp_path / "x.csv", table)
    x = load_x(path, ["tiny", "age"])
    assert x.shape == (50, 2) and x.dtype == np.float64 and x.flags.f_contiguous
    np.testing.assert_array_equal(x[:, 0], table["tiny"])  # repr() round-trips exactly
    np.testing.assert_array_equal(x[:, 1], table["age"])
    np.testing.assert_array_equal(load_y(str(path), "income"), table["income"])


@pytest.mark.parametrize("one_way", [False, True], ids=["file", "stream"])
def test_csv_header_names_match_with_their_spaces_trimmed(tmp_path: Path, one_way: bool) -> None:
    # "age, income": the schema read from this header (as `cape dataviews add --schema-from-file` does) says "income".
    data = b"age, income ,tiny\n30, 1000.5 ,1\n40,2000,2\n"
    source = OneWayStream(data) if one_way else (tmp_path / "x.csv")
    if not one_way:
        source.write_bytes(data)
    x = load_x(source, ["income", "age"], name="x.csv")
    np.testing.assert_array_equal(x, [[1000.5, 30.0], [2000.0, 40.0]])
    # An exact name still wins over a trimmed one; a name that only trimming makes twice is refused, by name.
    (tmp_path / "both.csv").write_bytes(b"a, a\n1,2\n")
    np.testing.assert_array_equal(load_y(tmp_path / "both.csv", "a"), [1.0])
    (tmp_path / "twice.csv").write_bytes(b" a,a \n1,2\n")
    with pytest.raises(UnreadableDataError) as caught:
        load_y(tmp_path / "twice.csv", "a", name="twice.csv")
    assert str(caught.value) == "twice.csv: column 'a' is named 2 times in the header (with different spaces around it)"
    with pytest.raises(MissingColumnError) as missing:
        load_y(tmp_path / "both.csv", "debt", name="f.csv")
    assert "no column 'debt'" in str(missing.value)


def test_a_column_named_twice_in_the_file_is_refused_not_guessed(tmp_path: Path) -> None:
    (tmp_path / "dup.csv").write_bytes(b"age,age,y\n1,2,3\n4,5,6\n")
    pq.write_table(pa.Table.from_arrays([pa.array([1.0, 2.0]), pa.array([3.0, 4.0])], names=["a", "a"]),
                   tmp_path / "dup.parquet")
    for path, column in ((tmp_path / "dup.csv", "age"), (tmp_path / "dup.parquet", "a")):
        with pytest.raises(UnreadableDataError) as caught:
            load_x(path, [column], name=path.name)
        assert str(caught.value) == (f"{path.name}: column {column!r} is named 2 times in the file; give each column "
                                     "its own name")
    np.testing.assert_array_equal(load_y(tmp_path / "dup.csv", "y"), [3.0, 6.0])  # the other columns still load


def test_parquet_by_file_uri_and_by_magic_bytes(tmp_path: Path, table) -> None:
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table(table), path)
    np.testing.assert_array_equal(load_x(f"file://{path}", ["income", "age"])[:, 0], table["income"])
    misnamed = tmp_path / "data.csv"  # the extension lies; the first bytes decide
    misnamed.write_bytes(path.read_bytes())
    np.testing.assert_array_equal(load_y(misnamed, "tiny"), table["tiny"])
    assert read_columns(path) == ["age", "income", "tiny"]


def test_integer_and_string_parquet_columns_are_converted(tmp_path: Path) -> None:
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"n": pa.array([1, 2, 3], pa.int32()), "s": ["1.5", " 2 ", "-3e2"]}), path)
    np.testing.assert_array_equal(load_x(path, ["n", "s"]), [[1, 1.5], [2, 2], [3, -300]])


def test_open_file_objects_seekable_and_one_way(tmp_path: Path, table) -> None:
    csv_path = write_csv(tmp_path / "x.csv", table)
    with open(csv_path, "rb") as handle:
        np.testing.assert_array_equal(load_y(handle, "age"), table["age"])
    np.testing.assert_array_equal(load_y(OneWayStream(csv_path.read_bytes()), "age", name="s3://b/x.csv"), table["age"])
    parquet_path = tmp_path / "x.parquet"
    pq.write_table(pa.table(table), parquet_path)
    np.testing.assert_array_equal(load_y(OneWayStream(parquet_path.read_bytes()), "income"), table["income"])


def test_large_csv_is_read_by_pyarrow(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200_000, 3))
    path = tmp_path / "big.csv"
    np.savetxt(path, x, delimiter=",", header="a,b,c", comments="", fmt="%.17g")
    np.testing.assert_array_equal(load_x(path, ["c", "a"]), x[:, [2, 0]])


@pytest.mark.parametrize("one_way", [False, True])
def test_non_numeric_names_file_column_and_first_bad_row(tmp_path: Path, one_way: bool) -> None:
    lines = ["id,age"] + [f"{i},{20 + i % 50}" for i in range(1, 100_001)]
    lines[70_000] = "70000,abc"  # data row 70000
    lines[90_000] = "90000,xyz"
    data = ("\n".join(lines) + "\n").encode()
    path = tmp_path / "x.csv"
    path.write_bytes(data)
    source = OneWayStream(data) if one_way else path
    with pytest.raises(NonNumericError) as caught:
        load_x(source, ["id", "age"], name="x.csv")
    assert str(caught.value) == "x.csv: column 'age' row 70000: the value is not a number"
    assert caught.value.row == 70000


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        (b"a,b\n1,2\n3,\n", NonNumericError, "x.csv: column 'b' row 2: the value is empty"),
        # An empty line is a row (pyarrow skipped it, shifting every later row against the other owner's file).
        (b"a,b\n1,2\n\n3,4\n", NonNumericError, "x.csv: column 'a' row 2: the value is empty"),
        (b"a,b\n1,2\n3,nan\n", NonFiniteError,
         "x.csv: column 'b' row 2: the value is NaN (not a number); every value must be a finite number"),
        (b"a,b\n1,2\n-inf,4\n5,inf\n", NonFiniteError,
         "x.csv: column 'a' row 2: the value is infinite (or beyond the float64 range); every value must be a "
         "finite number"),
        (b"a,b\n1,2\n3,1e999\n", NonFiniteError,
         "x.csv: column 'b' row 2: the value is infinite (or beyond the float64 range); every value must be a "
         "finite number"),
        (b"a,b\n1,2\n3\n", UnreadableDataError,
         "x.csv: row 2 has 1 fields but the header has 2; every row needs one value per column"),
        (b"", UnreadableDataError, "x.csv: the file is empty; expected a CSV file with a header row, or Parquet"),
        (b"a,b\n1,2\n", MissingColumnError, "x.csv: no column 'c'; the file has 'a', 'b'"),
    ],
)
def test_bad_csv_messages(tmp_path: Path, text: bytes, error: type, message: str) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(text)
    columns = ["a", "c"] if error is MissingColumnError else ["a", "b"]
    with pytest.raises(error) as caught:
        load_x(path, columns, name="x.csv")
    assert str(caught.value) == message
    assert isinstance(caught.value, JobDataError)


@pytest.mark.parametrize("ending", [b"\n\n", b"\n\n\n", b"\r\n\r\n", b""])
def test_blank_lines_at_the_end_of_a_file_are_no_rows(tmp_path: Path, ending: bytes) -> None:
    """An editor's or `echo >>`'s trailing blank lines: no rows, in a one-column file or several (a missing last value
    then shows as a row count differing from the other owner's file)."""
    path = tmp_path / "x.csv"
    path.write_bytes(b"a,b\n1,2\n3,4" + ending)
    np.testing.assert_array_equal(load_x(path, ["a", "b"], name="x.csv"), [[1.0, 2.0], [3.0, 4.0]])
    path.write_bytes(b"y\n2\n4" + ending)
    np.testing.assert_array_equal(load_y(path, "y", name="y.csv"), [2.0, 4.0])
    path.write_bytes(b"a,b\n1,2\nx,4" + ending)  # the slower pass that names a bad row reads it the same way
    with pytest.raises(NonNumericError, match=r"^x.csv: column 'a' row 2: the value is not a number$"):
        load_x(path, ["a", "b"], name="x.csv")


def test_an_empty_line_in_a_one_column_file_is_a_missing_value_not_a_skipped_row(tmp_path: Path) -> None:
    """pandas writes a one-column frame's NaN as an empty line; both the fast and the streaming reader see it."""
    path = tmp_path / "y.csv"
    path.write_bytes(b"y\n2\n4\n\n8\n")
    with pytest.raises(NonNumericError, match=r"^y.csv: column 'y' row 3: the value is empty$"):
        load_y(path, "y", name="y.csv")
    path.write_bytes(b"y\n2\nabc\n\n8\n")  # a bad value first: the streaming pass counts the empty line too
    with pytest.raises(NonNumericError, match=r"^y.csv: column 'y' row 2: the value is not a number$"):
        load_y(path, "y", name="y.csv")
    path.write_bytes(b"y\n2\n\nabc\n")
    with pytest.raises(NonNumericError, match=r"^y.csv: column 'y' row 2: the value is empty$"):
        load_y(path, "y", name="y.csv")


def test_a_file_that_is_not_utf8_text_says_so_without_a_traceback(tmp_path: Path, capfd) -> None:
    """pyarrow decodes an invalid row before calling the row handler: its UnicodeDecodeError was printed as an
    "Exception ignored" traceback (in a worker's log too), then a message about column counts."""
    path = tmp_path / "x.csv"
    path.write_bytes(b"a\n" + bytes(range(256)) * 4)
    with pytest.raises(UnreadableDataError, match=r"^x.csv: not UTF-8 text; save the CSV file as UTF-8 \(or give a "
                                                  r"Parquet file\)$"):
        load_x(path, ["a"], name="x.csv")
    path.write_bytes(b"a,b\n1,caf\xe9\n2,x\n")  # the right number of fields, one not UTF-8
    with pytest.raises(UnreadableDataError, match=r"^x.csv: not UTF-8 text"):
        load_x(path, ["a", "b"], name="x.csv")
    assert "Traceback" not in capfd.readouterr().err
    np.testing.assert_array_equal(load_x(path, ["a"], name="x.csv"), [[1.0], [2.0]])  # an unused column may be


def test_a_text_file_named_parquet_and_a_semicolon_header_are_said_so(tmp_path: Path) -> None:
    text = tmp_path / "x.parquet"
    text.write_text("hello\n1\n")
    with pytest.raises(UnreadableDataError, match=r"^x.parquet: the name says Parquet, but the file does not start "
                                                  r"as Parquet files do \(PAR1\); give a Parquet file, or a CSV file$"):
        load_x(text, ["hello"], name="x.parquet")
    semicolons = tmp_path / "x.csv"
    semicolons.write_text("a;b\n1;2\n")
    hint = " (the header is one column holding ';': only ',' separates columns; export the file with commas)"
    with pytest.raises(MissingColumnError) as caught:
        load_x(semicolons, ["a"], name="x.csv")
    assert str(caught.value) == "x.csv: no column 'a'; the file has 'a;b'" + hint
    with pytest.raises(NonNumericError) as caught:
        load_x(semicolons, ["a;b"], name="x.csv")
    assert str(caught.value) == "x.csv: column 'a;b' row 1: the value is not a number" + hint


def test_bad_parquet_values(tmp_path: Path) -> None:
    path = tmp_path / "y.parquet"
    pq.write_table(pa.table({"y": pa.array([1.0, None, 3.0]), "s": ["1", "2", "x"], "when": pa.array([1, 2, 3], pa.timestamp("s"))}), path)
    with pytest.raises(NonNumericError, match=r"y.parquet: column 'y' row 2: the value is empty"):
        load_y(path, "y")
    with pytest.raises(NonNumericError, match=r"y.parquet: column 's' row 3: the value is not a number"):
        load_y(path, "s")
    with pytest.raises(UnreadableDataError, match=r"column 'when' holds timestamp\[m?s\] values, not numbers"):
        load_y(path, "when")


def test_missing_file_and_unsupported_uri(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError) as caught:
        load_x(tmp_path / "nope.csv", ["a"])
    assert str(caught.value).startswith(f"{tmp_path / 'nope.csv'}: no such file; check the path")
    with pytest.raises(MissingFileError, match="is a directory"):
        load_y(tmp_path, "a")
    with pytest.raises(UnreadableDataError, match=r"cannot read s3:// here"):
        load_y("s3://bucket/y.csv", "a")


def test_a_bad_cell_is_never_quoted(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a\n" + "z" * 500 + "\n")
    with pytest.raises(NonNumericError) as caught:
        load_y(path, "a", name="x.csv")
    assert str(caught.value) == "x.csv: column 'a' row 1: the value is not a number"


def test_binary_garbage_is_unreadable_and_not_quoted(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(bytes(range(128, 256)) * 8 + b"\n1,2\n")
    with pytest.raises(UnreadableDataError) as caught:
        load_y(path, "a", name="x.csv")
    assert str(caught.value) == "x.csv: not a CSV file with a UTF-8 header row, nor a Parquet file"


def test_a_large_x_lands_in_a_populated_writable_array() -> None:
    from services.jobs.linear_regression.data import _populated_empty

    x = _populated_empty((300_000, 32))  # 73 MB: above the threshold where the mapping is populated up front
    assert x.shape == (300_000, 32) and x.dtype == np.float64 and x.flags.f_contiguous and x.flags.writeable
    x[:] = 1.5
    assert float(x.sum()) == 1.5 * 300_000 * 32


def _compress(compression: str, data: bytes) -> bytes:
    import bz2
    import gzip
    import lzma

    if compression == "zstd":
        return pa.Codec("zstd").compress(data, asbytes=True)
    return {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress}[compression](data)


COMPRESSIONS = ["gzip", "bzip2", "zstd", "xz"]


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("one_way", [False, True])
def test_a_compressed_csv_is_read_through_its_decompression(tmp_path, compression, one_way):
    """Read as CSV, a gzip'd file failed with "Row #2: Expected 6 columns, got 5", after all of it was read."""
    rows = 50_000  # past the first 64 KiB read for the header, and past arrow's first block
    text = "a, b\n" + "".join(f"{i},{i * 0.5}\n" for i in range(rows)) + "\n\n"  # trailing blank lines: no rows
    data = _compress(compression, text.encode())
    path = tmp_path / "x.csv.gz"
    path.write_bytes(data)

    def source():
        return OneWayStream(data) if one_way else path

    x = load_x(source(), ["a", "b"], name="x.csv.gz")
    assert x.shape == (rows, 2)
    np.testing.assert_array_equal(x[:, 0], np.arange(rows))
    np.testing.assert_array_equal(x[:, 1], np.arange(rows) * 0.5)
    np.testing.assert_array_equal(load_y(source(), "b", name="x.csv.gz"), np.arange(rows) * 0.5)
    assert read_columns(source(), name="x.csv.gz") == ["a", "b"]


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("one_way", [False, True])
def test_a_bad_value_in_a_compressed_csv_names_its_row(tmp_path, compression, one_way):
    lines = [f"{i},{i}" for i in range(30_000)]
    lines[25_000] = "1,many"
    data = _compress(compression, ("a,b\n" + "\n".join(lines) + "\n").encode())
    path = tmp_path / "x.csv.gz"
    path.write_bytes(data)
    with pytest.raises(NonNumericError) as caught:
        load_x(OneWayStream(data) if one_way else path, ["a", "b"], name="x.csv.gz")
    assert "row 25001" in str(caught.value) and "many" not in str(caught.value)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_a_cut_compressed_csv_is_an_error_not_fewer_rows(tmp_path, compression):
    data = _compress(compression, ("a,b\n" + "".join(f"{i},{i}\n" for i in range(40_000))).encode())
    path = tmp_path / "x.csv.gz"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(UnreadableDataError) as caught:
        load_x(path, ["a", "b"], name="x.csv.gz")
    assert str(caught.value).startswith(f"x.csv.gz: the {compression}-compressed file is damaged or cut short (")


def test_a_damaged_gzip_csv_is_an_error(tmp_path):
    data = bytearray(_compress("gzip", ("a,b\n" + "".join(f"{i},{i}\n" for i in range(40_000))).encode()))
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "x.csv.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(UnreadableDataError) as caught:
        load_y(path, "a", name="x.csv.gz")
    assert "the gzip-compressed file is damaged or cut short" in str(caught.value)


def test_a_compressed_parquet_file_is_refused(tmp_path, table):
    buffer = io.BytesIO()
    pq.write_table(pa.table(table), buffer)
    path = tmp_path / "x.parquet.gz"
    path.write_bytes(_compress("gzip", buffer.getvalue()))
    with pytest.raises(UnreadableDataError) as caught:
        load_y(path, "a", name="x.parquet.gz")
    assert str(caught.value) == ("x.parquet.gz: the file is a gzip-compressed Parquet file; give the Parquet file "
                                 "itself (it compresses its columns inside)")


def test_a_zip_archive_is_refused(tmp_path):
    import zipfile

    path = tmp_path / "x.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.csv", "a,b\n1,2\n")
    with pytest.raises(UnreadableDataError) as caught:
        load_x(path, ["a", "b"], name="x.zip")
    assert str(caught.value) == "x.zip: the file is a zip archive; give the CSV or Parquet file inside it"


def test_a_csv_whose_first_column_starts_like_a_bzip2_file_is_read(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("BZh9,b\n1,2\n3,4\n")
    np.testing.assert_array_equal(load_x(path, ["BZh9", "b"]), [[1.0, 2.0], [3.0, 4.0]])


def test_check_ends_says_what_the_first_bytes_and_footer_show_as_the_loaders_say_it(tmp_path, table):
    from services.jobs.linear_regression.data import check_ends, head_size

    def ends(data: bytes) -> tuple[bytes, object]:
        return data[:65536], lambda n: data[-n:] if n else b""

    csv = write_csv(tmp_path / "x.csv", table).read_bytes()
    buffer = io.BytesIO()
    pq.write_table(pa.table(table), buffer)
    for data in (csv, buffer.getvalue()):
        check_ends("x", ["income", "age"], *ends(data))  # both there: quiet
        with pytest.raises(MissingColumnError) as early:
            check_ends("x", ["age", "weight"], *ends(data))
        with pytest.raises(MissingColumnError) as late:
            load_x(io.BytesIO(data), ["age", "weight"], name="x")
        assert str(early.value) == str(late.value)
    check_ends("x", ["b"], b"a, b\n1,", lambda n: b"")  # a trimmed name, as the loaders match it
    check_ends("x", ["nope"], b"a,b,c", lambda n: b"")  # the header goes on past the bytes read: the loaders tell
    # Rows that compress to far more than 64 KiB: each decoder must give the header from a cut start.
    rows = b"a,b\n" + b"".join(b"%d,%d\n" % (i, (i * 7919) % 100_003) for i in range(400_000))
    for compression in COMPRESSIONS:
        packed = _compress(compression, rows)
        assert len(packed) > 300_000
        head = packed[:head_size(packed[:65536], 65536)]
        assert len(head) == (65536 if compression != "bzip2" else 913_096)  # bzip2: its first block, level 9
        with pytest.raises(MissingColumnError) as early:
            check_ends("x", ["nope"], head, lambda n: b"")
        with pytest.raises(MissingColumnError) as late:
            load_y(io.BytesIO(packed), "nope", name="x")
        assert str(early.value) == str(late.value)
        check_ends("x", ["a", "b"], head, lambda n: b"")
    check_ends("x", ["nope"], _compress("bzip2", rows)[:65536], lambda n: b"")  # a block cut short: the loader tells
    with pytest.raises(UnreadableDataError, match="^x: the file is empty"):
        check_ends("x", ["a"], b"", lambda n: b"")
