"""Dataview schemas from `--schema` specs, CSV headers and Python values; column selection and job bodies."""
from __future__ import annotations

from pathlib import Path

import pytest

from services.client.errors import BadArgument
from services.client.http import ApiSession
from services.client.models import DataView
from services.client.schema import local_csv_path, normalise_schema, parse_schema_spec, schema_from_csv
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
    assert schema_from_csv(csv) == [
        {"name": "id", "type": "integer"},
        {"name": "height", "type": "number"},
        {"name": "city", "type": "string"},
        {"name": "weight", "type": "integer"},
    ]


def test_schema_from_csv_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(BadArgument, match=f"{tmp_path / 'missing.csv'} does not exist"):
        schema_from_csv(tmp_path / "missing.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(BadArgument, match="has no header line"):
        schema_from_csv(empty)


def test_local_csv_path(tmp_path: Path) -> None:
    csv = tmp_path / "data set.csv"
    csv.write_text("a\n1\n")
    assert local_csv_path(str(csv)) == csv
    assert local_csv_path(f"file://{str(csv).replace(' ', '%20')}") == csv
    assert local_csv_path("s3://bucket/x.csv") is None
    assert local_csv_path(str(tmp_path / "absent.csv")) is None


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
    ({"model_owner": "o", "model_location": "http://x"}, "model_location must be s3://"),
    ({"model_owner": "o", "timeout": 0}, "timeout must be a positive"),
])
def test_linear_regression_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(BadArgument, match=message):
        VerticallyPartitionedLinearRegression(_view("x", ["a"]), _view("y", ["t"]), **kwargs)
