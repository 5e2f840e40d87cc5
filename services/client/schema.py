"""Dataview schemas: from ``name:type,...``, from a local CSV or Parquet file, or normalised from Python values."""
from __future__ import annotations

import csv
import io
import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable
from urllib.parse import unquote, urlparse

from services.client.columns import split_columns
from services.client.errors import BadArgument

if TYPE_CHECKING:
    import pyarrow as pa

TYPES = ("number", "integer", "string")
# Rows read to guess a column's type from a CSV; the header alone names the columns.
SAMPLE_ROWS = 200
# A Parquet file's first bytes; services/jobs/linear_regression/data.py tells the formats apart by them too.
PARQUET_MAGIC = b"PAR1"

Schema = list[dict[str, str]]


def parse_schema_spec(spec: str) -> Schema:
    """``"a:number,b:integer,c"`` -> schema; a column without a type is a number."""
    schema: Schema = []
    items = split_columns(spec, f"the schema {spec!r}")  # an entry whose name holds a comma is quoted whole
    if not any(items):
        items = []  # said below: the schema is empty
    elif items[-1] == "":
        items.pop()  # a trailing comma
    for item in items:
        if not item:  # a missing name (an unset shell variable?) would be a column silently left out
            raise BadArgument(f"the schema {spec!r} has an empty entry (two commas in a row); give it as "
                              "name:type,... (types: number, integer, string)")
        name, _, kind = item.partition(":")
        schema.append(_column(name.strip(), kind.strip() or "number"))
    if not schema:
        raise BadArgument("the schema is empty; give it as name:type,... (types: number, integer, string)")
    _check_unique(schema)
    return schema


def schema_from_file(path: str | Path, notes: list[str] | None = None) -> Schema:
    """The columns of a local CSV (header; types guessed from the first rows; plain, or compressed whole with gzip,
    bzip2, zstd or xz) or Parquet file (its schema).

    The format is told from the first bytes, as the workers tell it, so a file's extension may lie. `notes` gets a
    line for each CSV column guessed `string` although it holds numbers: no job could use it as x or y."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            parquet = handle.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC
        if not parquet and path.suffix.lower() in (".parquet", ".pq"):  # the workers refuse it alike
            raise BadArgument(f"{path}: the name says Parquet, but the file does not start as Parquet files do "
                              "(PAR1); give a Parquet file, or a CSV file")
        schema = _parquet_schema(path) if parquet else _csv_schema(path, notes)
    except FileNotFoundError:
        raise BadArgument(f"{path} does not exist; give the path of a local CSV or Parquet file") from None
    except OSError as exc:
        raise BadArgument(f"cannot read {path}: {exc.strerror}") from None
    _check_unique(schema)
    return schema


def schema_from_uri(uri: str, dataview: str, options: str, notes: list[str] | None = None) -> Schema:
    """The schema of a dataview read from its own ``uri`` when that is a local file.

    ``options`` says, in the caller's terms (SDK keywords or CLI options), how else to give the schema."""
    path = local_file_path(uri)
    if path is None:
        reason = f"{uri} is not a local file"
    elif not path.exists():
        reason = f"{path} does not exist on this machine"
    else:
        return schema_from_file(path, notes)
    raise BadArgument(f"give the schema of dataview {dataview!r} ({options}); {reason}")


def check_schema_against_uri(schema: Schema, uri: str) -> None:
    """When ``uri`` is a file on this machine, refuse a schema naming columns it lacks: the owner's worker would
    otherwise fail the job on them, after every data owner approved it."""
    path = local_file_path(uri)
    if path is None or not path.is_file():
        return  # s3://, or a path on the worker's machine only: the worker checks when it runs
    found = [column["name"] for column in schema_from_file(path)]
    missing = [column["name"] for column in schema if column["name"] not in found]
    if missing:
        raise BadArgument(f"{path} has no column {', '.join(repr(m) for m in missing)} (its columns: "
                          f"{', '.join(found)}); fix the schema, or leave it out to read it from the file")


def local_file_path(uri: str) -> Path | None:
    """The local path ``uri`` names (a plain path or file://), whether or not it exists; None for s3:// and such."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and uri[1:2] == ":"):
        return Path(uri)
    return None


def normalise_schema(schema: Any) -> Schema:
    """Accept a schema as [{"name", "type"}], {name: type}, [name, ...] or a ``name:type,...`` string.

    pycape's forms work too: ``[{"name", "schema_type"}]``, and a pandas ``df.dtypes`` (or a {name: dtype} dict),
    whose integer and boolean columns are integers, floating ones numbers and the others strings."""
    if isinstance(schema, str):
        return parse_schema_spec(schema)
    if isinstance(schema, dict) or callable(getattr(schema, "items", None)):
        result = [_column(str(k), _type_name(v)) for k, v in schema.items()]
    elif isinstance(schema, Iterable):
        result = []
        for item in schema:
            if isinstance(item, str):
                result.append(_column(item, "number"))
            elif isinstance(item, dict) and "name" in item:
                result.append(_column(str(item["name"]), _entry_type(item)))
            else:
                raise BadArgument(f"cannot read schema entry {item!r}; use {{'name': ..., 'type': ...}}")
    else:
        raise BadArgument("the schema must be a list of {'name', 'type'}, a {name: type} dict or a string")
    _check_unique(result)
    return result


def _entry_type(item: dict[str, Any]) -> str:
    """The type of a ``{"name", "type"}`` entry; pycape's ``schema_type`` key is the same thing."""
    kinds = {str(item[key]) for key in ("type", "schema_type") if key in item}
    if len(kinds) > 1:
        raise BadArgument(f"column {item['name']!r} has both type and schema_type, and they differ; give one")
    return kinds.pop() if kinds else "number"


def _type_name(kind: Any) -> str:
    """A schema type from a type name, or from a numpy/pandas dtype (or a Python type) as ``df.dtypes`` holds."""
    if isinstance(kind, str):
        return kind
    code = getattr(kind, "kind", None)  # numpy dtypes and pandas extension dtypes
    if not isinstance(code, str):
        import numpy as np  # here, as pyarrow below: the string and dict forms need neither

        try:
            code = np.dtype(kind).kind
        except TypeError:
            return str(kind)
    if code in "iub":
        return "integer"
    if code == "f":
        return "number"
    if code in "OUS":
        return "string"
    return str(kind)  # datetimes, complex numbers, ...: _column names the type it refuses


def _column(name: str, kind: str) -> dict[str, str]:
    if not name:
        raise BadArgument("a schema column has an empty name")
    if kind not in TYPES:
        raise BadArgument(f"column {name!r} has type {kind!r}; the types are {', '.join(TYPES)}")
    return {"name": name, "type": kind}


def _check_unique(schema: Schema) -> None:
    seen: set[str] = set()
    for column in schema:
        if column["name"] in seen:
            raise BadArgument(f"column {column['name']!r} appears twice in the schema")
        seen.add(column["name"])


def _csv_schema(path: Path, notes: list[str] | None = None) -> Schema:
    from services.jobs.linear_regression import JobDataError
    from services.jobs.linear_regression.data import decompressed  # a gzip'd CSV, say, read as the workers read it

    # -sig: Excel's "CSV UTF-8" starts with a BOM. A value that is not UTF-8 (in a column no job may use; the
    # workers read only the columns a job names) is a string; the names must be text.
    with path.open("rb") as raw:
        try:
            handle = io.TextIOWrapper(decompressed(raw, name=str(path)), encoding="utf-8-sig",
                                      errors="surrogateescape", newline="")
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header:
                raise BadArgument(f"{path} has no header line; the first line must name the columns")
            samples = list(itertools.islice(reader, SAMPLE_ROWS))
        except JobDataError as exc:
            raise BadArgument(str(exc)) from None
    if any(_undecodable(name) for name in header):
        raise BadArgument(f"{path} is neither a UTF-8 text CSV file nor a Parquet file (its header is not UTF-8)")
    schema = []
    for index, name in enumerate(header):
        cells = [(number, row[index].strip()) for number, row in enumerate(samples, 1)
                 if index < len(row) and row[index].strip()]
        kind = _guess_type([value for _, value in cells])
        schema.append(_column(name.strip(), kind))
        numbers = [_parses(float, value) for _, value in cells]
        if kind == "string" and notes is not None and any(numbers):  # numbers, and one that is not: a typo?
            row = cells[numbers.index(False)][0]
            notes.append(f"column {name.strip()!r} is registered as string: row {row} is not a number (the value is "
                         "not shown), so no job can use it as x or y; fix the file and add the dataview again, or "
                         "give the column's type yourself")
    return schema


def _undecodable(text: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in text)  # surrogateescape's stand-ins for bytes that are not UTF-8


def _parquet_schema(path: Path) -> Schema:
    import pyarrow as pa  # here, not at the top: `import services.client` stays quick without Parquet
    import pyarrow.parquet as pq

    try:
        fields = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadArgument(f"{path} is not a readable Parquet file ({reason})") from None
    _check_unique([_column(field.name, "string") for field in fields])  # before columns are looked up by name
    kinds = {field.name: _arrow_type(field.type) for field in fields}
    # Text columns get the CSV's guess from their first rows: numbers stored as text are numbers to the workers,
    # which read them as such (and so does `cape simulate`).
    text = [field.name for field in fields if pa.types.is_string(field.type) or pa.types.is_large_string(field.type)]
    if text:
        try:
            batch = next(pq.ParquetFile(path).iter_batches(batch_size=SAMPLE_ROWS, columns=text), None)
        except (pa.ArrowException, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BadArgument(f"{path} is not a readable Parquet file ({reason})") from None
        for name in text if batch is not None else ():
            kinds[name] = _guess_type([v.strip() for v in batch.column(name).to_pylist() if v and v.strip()])
    return [_column(field.name, kinds[field.name]) for field in fields]


def _arrow_type(kind: pa.DataType) -> str:
    """The type name a CSV's guess would give; booleans are integers because the workers read them as 1 and 0."""
    from pyarrow import types

    if types.is_integer(kind) or types.is_boolean(kind):
        return "integer"
    if types.is_floating(kind) or types.is_decimal(kind):
        return "number"
    return "string"


def _guess_type(values: list[str]) -> str:
    if not values:
        return "number"
    if all(_parses(int, v) for v in values):
        return "integer"
    if all(_parses(float, v) for v in values):
        return "number"
    return "string"


def _parses(kind: type, value: str) -> bool:
    try:
        kind(value)
    except ValueError:
        return False
    return True
