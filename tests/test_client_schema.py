"""Dataview schemas from `--schema` specs, CSV headers and Python values; column selection and job bodies."""
from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.client.errors import BadArgument
from services.client.http import ApiSession
from services.client.models import DataView
from services.client.schema import (
    local_file_path, normalise_schema, parse_schema_spec, schema_from_file, schema_from_uri,
)
from services.client.tasks import VerticallyPartitionedLinearRegression


def test_parse_schema_spec() -> None:
    assert parse_schema_spec("age:integer, income:number,name:string,score") == [
        {"name": "age", "type": "integer"},
        {"name": "income", "type": "number"},
        {"name": "name", "type": "string"},
        {"name": "score", "type": "number"},
    ]


@pytest.mark.parametrize("spec, message", [
    ("a:float", "column 'a' has type 'float'; the types are number, integer, string"),
    ("a,a:integer", "column 'a' appears twice"),
    (" , ", "the schema is empty"),
    (":number", "a schema column has an empty name"),
])
def test_bad_schema_specs(spec: str, message: str) -> None:
    with pytest.raises(BadArgument, match=message):
        parse_schema_spec(spec)


def test_schema_from_csv_guesses_types(tmp_path: Path) -> None:
    csv = tmp_path / "x.csv"
    csv.write_text("id,height,city, weight \n1,1.5,Paris,70\n2,2e3,Rome,\n3,-4,Oslo,80\n")
    assert schema_from_file(csv) == [
        {"name": "id", "type": "integer"},
        {"name": "height", "type": "number"},
        {"name": "city", "type": "string"},
        {"name": "weight", "type": "integer"},
    ]


def test_schema_from_csv_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(BadArgument, match=f"{tmp_path / 'missing.csv'} does not exist"):
        schema_from_file(tmp_path / "missing.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(BadArgument, match="has no header line"):
        schema_from_file(empty)


def test_schema_from_a_compressed_csv_is_read_through_its_decompression(tmp_path: Path) -> None:
    import gzip
    import zipfile

    packed = tmp_path / "people.csv.gz"
    packed.write_bytes(gzip.compress(b"age, height,city\n30,1.8,Oslo\n41,1.7,Rome\n"))
    assert schema_from_file(packed) == [{"name": "age", "type": "integer"}, {"name": "height", "type": "number"},
                                        {"name": "city", "type": "string"}]
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(packed.read_bytes()[:20])
    with pytest.raises(BadArgument, match=f"^{cut}: the gzip-compressed file is damaged or cut short \\("):
        schema_from_file(cut)
    archive = tmp_path / "people.zip"
    with zipfile.ZipFile(archive, "w") as opened:
        opened.writestr("people.csv", "age\n30\n")
    with pytest.raises(BadArgument) as info:
        schema_from_file(archive)
    assert str(info.value) == f"{archive}: the file is a zip archive; give the CSV or Parquet file inside it"


def test_schema_from_parquet_names_and_types(tmp_path: Path) -> None:
    parquet = tmp_path / "x.parquet"
    pq.write_table(pa.table({
        "age": pa.array([30, 41], pa.int32()), "height": [1.8, 1.7], "city": ["Oslo", "Rome"],
        "member": [True, False], "price": pa.array([Decimal("1.50"), Decimal("2.25")], pa.decimal128(5, 2)),
        # Numbers stored as text: the workers (and `cape simulate`) read them as numbers, so the schema says so.
        "income": ["1200.5", " 2200 "], "rooms": pa.array(["3", None], pa.large_string()),
    }), parquet)
    expected = [{"name": "age", "type": "integer"}, {"name": "height", "type": "number"},
                {"name": "city", "type": "string"}, {"name": "member", "type": "integer"},
                {"name": "price", "type": "number"}, {"name": "income", "type": "number"},
                {"name": "rooms", "type": "integer"}]
    assert schema_from_file(parquet) == expected
    disguised = tmp_path / "really-parquet.csv"  # the format comes from the first bytes, as for the workers
    disguised.write_bytes(parquet.read_bytes())
    assert schema_from_file(disguised) == expected


def test_schema_from_parquet_with_a_name_twice_says_so(tmp_path: Path) -> None:
    parquet = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["1", "2"]), pa.array(["3", "4"])], names=["a", "a"]), parquet)
    with pytest.raises(BadArgument, match="column 'a' appears twice in the schema"):
        schema_from_file(parquet)


def test_schema_from_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(BadArgument) as info:
        schema_from_file(tmp_path / "missing.parquet")
    assert str(info.value) == (
        f"{tmp_path / 'missing.parquet'} does not exist; give the path of a local CSV or Parquet file")
    binary = tmp_path / "x.bin"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(BadArgument) as info:
        schema_from_file(binary)
    assert str(info.value) == f"{binary} is neither a UTF-8 text CSV file nor a Parquet file (its header is not UTF-8)"
    latin1 = tmp_path / "notes.csv"  # a value that is not UTF-8, in a column a job would not use (the workers read it)
    latin1.write_bytes(b"x,note\n1,caf\xe9\n2,ok\n")
    assert schema_from_file(latin1) == [{"name": "x", "type": "integer"}, {"name": "note", "type": "string"}]
    text = tmp_path / "text.parquet"
    text.write_text("hello\n")
    with pytest.raises(BadArgument, match=f"^{text}: the name says Parquet, but the file does not start as Parquet"):
        schema_from_file(text)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 cut short")
    with pytest.raises(BadArgument, match=f"^{broken} is not a readable Parquet file \\(.+\\)$"):
        schema_from_file(broken)


def test_schema_from_uri_says_why_it_cannot_read_one(tmp_path: Path) -> None:
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n1,x\n")
    assert schema_from_uri(csv.as_uri(), "v", "OPTIONS") == [{"name": "a", "type": "integer"},
                                                            {"name": "b", "type": "string"}]
    with pytest.raises(BadArgument) as info:
        schema_from_uri("s3://bucket/x.parquet", "v", "OPTIONS")
    assert str(info.value) == "give the schema of dataview 'v' (OPTIONS); s3://bucket/x.parquet is not a local file"
    with pytest.raises(BadArgument) as info:
        schema_from_uri(f"file://{tmp_path}/absent.parquet", "v", "OPTIONS")
    assert str(info.value) == (
        f"give the schema of dataview 'v' (OPTIONS); {tmp_path / 'absent.parquet'} does not exist on this machine")


def test_local_file_path(tmp_path: Path) -> None:
    csv = tmp_path / "data set.csv"
    assert local_file_path(str(csv)) == csv
    assert local_file_path(f"file://{str(csv).replace(' ', '%20')}") == csv
    assert local_file_path("s3://bucket/x.csv") is None


def test_normalise_schema_shapes() -> None:
    expected = [{"name": "a", "type": "number"}, {"name": "b", "type": "integer"}]
    assert normalise_schema({"a": "number", "b": "integer"}) == expected
    assert normalise_schema(expected) == expected
    assert normalise_schema("a,b:integer") == expected
    assert normalise_schema(["a"]) == expected[:1]


def _view(name: str, columns: list[str]) -> DataView:
    data = {"id": f"id-{name}", "name": name, "schema": [{"name": c, "type": "number"} for c in columns]}
    return DataView(ApiSession("http://127.0.0.1:9", None), data)


def test_column_selection_pycape_style() -> None:
    x = _view("features", ["a", "b", "c"])
    assert x[["a", "c"]].columns == ["a", "c"]
    assert x["b"].columns == ["b"]
    assert x.columns is None  # selecting returns a copy
    with pytest.raises(BadArgument, match="dataview 'features' has no column 'z'; its columns are a, b, c"):
        x[["a", "z"]]


def test_linear_regression_request_body() -> None:
    x, y = _view("features", ["a", "b", "c"]), _view("target", ["t", "u"])
    job = VerticallyPartitionedLinearRegression(x[["c", "a"]], y["u"], model_owner="org-b",
                                                model_location="s3://bucket/prefix", timeout=30)
    assert job.to_request() == {
        "type": "linear_regression",
        "x": {"dataview": "id-features", "columns": ["c", "a"]},
        "y": {"dataview": "id-target", "column": "u"},
        "model_owner": "org-b",
        "model_location": "s3://bucket/prefix",
        "timeout": 30,
    }
    # Without a selection X takes every column; y needs exactly one.
    assert VerticallyPartitionedLinearRegression(x, y["t"], "o").to_request()["x"]["columns"] == ["a", "b", "c"]
    with pytest.raises(BadArgument, match="select exactly one y column of dataview 'target'"):
        VerticallyPartitionedLinearRegression(x, y, "o").to_request()


@pytest.mark.parametrize("kwargs, message", [
    ({"model_owner": None}, "name the model owner"),
    ({"model_owner": "o", "model_location": "http://x"},
     r"^model_location 'http://x': give s3://BUCKET\[/PREFIX\] or file:///ABSOLUTE/PATH$"),
    ({"model_owner": "o", "model_location": "s3://"}, "model_location 's3://': s3:// needs a bucket"),
    ({"model_owner": "o", "model_location": "file://relative/dir"}, "file:// needs an absolute path"),
    ({"model_owner": "o", "model_location": "s3://b/my models"}, "without spaces"),
    # As the model owner's worker refuses them at upload (it would after the whole computation):
    ({"model_owner": "o", "model_location": "s3://My_Models"}, "not a valid S3 bucket name"),
    ({"model_owner": "o", "model_location": "s3://models?versionId=3"}, "remove the \\?query or #fragment"),
    # A path-tidying proxy put `s3://models/../other-bucket`'s object in bucket other-bucket:
    ({"model_owner": "o", "model_location": "s3://models/../other-bucket"}, "may not hold '.', '..' or empty"),
    ({"model_owner": "o", "model_location": "s3://models/a/%2E%2E/b"}, "may not hold '.', '..' or empty"),
    ({"model_owner": "o", "model_location": "s3://models/a//b"}, "may not hold '.', '..' or empty"),
    ({"model_owner": "o", "timeout": 0}, "timeout must be a positive"),
    ({"model_owner": "o", "timeout": float("nan")}, "timeout must be a positive"),
])
def test_linear_regression_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(BadArgument, match=message):
        VerticallyPartitionedLinearRegression(_view("x", ["a"]), _view("y", ["t"]), **kwargs)


def test_a_timeout_below_a_second_is_rounded_up_not_down_to_zero() -> None:
    """0.5 became int(0.5) = 0, which the coordinator refuses (submit_job(timeout=0.5) already rounded up)."""
    task = VerticallyPartitionedLinearRegression(_view("x", ["a"]), _view("y", ["t"]), "o", timeout=0.5)
    assert task.to_request()["timeout"] == 1


def test_a_numeric_column_guessed_string_is_noted_with_its_row(tmp_path: Path) -> None:
    """The type came out `string` without a word, and a job using the column was refused at submission."""
    path = tmp_path / "y.csv"
    path.write_text("spend,note\n1.5,a\n2,b\n\n3.25,c\nabc,d\n")
    notes: list[str] = []
    assert schema_from_file(path, notes) == [{"name": "spend", "type": "string"}, {"name": "note", "type": "string"}]
    assert notes == ["column 'spend' is registered as string: row 5 is not a number (the value is not shown), so no "
                     "job can use it as x or y; fix the file and add the dataview again, or give the column's type "
                     "yourself"]  # 'note' holds no numbers: text, as meant


def test_a_name_holding_a_comma_is_quoted_in_every_column_list_the_cli_takes_and_prints() -> None:
    """Only `jobs submit --x` took quotes; `--schema` and `cape simulate --x` split at every comma, and listings
    printed such a name as two."""
    from services.client.simulate import split_spec
    from services.tables import cell_text

    assert parse_schema_spec('a:number, "b,c:integer"') == [{"name": "a", "type": "number"},
                                                            {"name": "b,c", "type": "integer"}]
    assert split_spec('x.csv:a,"b,c"') == ("x.csv", ["a", "b,c"])
    assert cell_text(["a", "b,c", 'say "hi", then']) == 'a, "b,c", "say ""hi"", then"'
    with pytest.raises(BadArgument, match="quote a name that holds a comma"):
        parse_schema_spec('a,"b')
