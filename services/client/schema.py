"""Dataview schemas: parsed from ``name:type,...``, taken from a local CSV header, or normalised from Python values."""
from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import unquote, urlparse

from services.client.errors import BadArgument

TYPES = ("number", "integer", "string")
# Rows read to guess a column's type from a CSV; the header alone names the columns.
SAMPLE_ROWS = 200

Schema = list[dict[str, str]]


def parse_schema_spec(spec: str) -> Schema:
    """``"a:number,b:integer,c"`` -> schema; a column without a type is a number."""
    schema: Schema = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, kind = item.partition(":")
        schema.append(_column(name.strip(), kind.strip() or "number"))
    if not schema:
        raise BadArgument("the schema is empty; give it as name:type,... (types: number, integer, string)")
    _check_unique(schema)
    return schema


def schema_from_csv(path: str | Path) -> Schema:
    """Column names from the CSV header; types guessed from the first rows (integer, number, else string)."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header:
                raise BadArgument(f"{path} has no header line; the first line must name the columns")
            samples = list(itertools.islice(reader, SAMPLE_ROWS))
    except FileNotFoundError:
        raise BadArgument(f"{path} does not exist; give the path of a local CSV file") from None
    except UnicodeDecodeError:
        raise BadArgument(f"{path} is not a UTF-8 text CSV file") from None
    except OSError as exc:
        raise BadArgument(f"cannot read {path}: {exc.strerror}") from None
    schema = []
    for index, name in enumerate(header):
        values = [row[index].strip() for row in samples if index < len(row) and row[index].strip()]
        schema.append(_column(name.strip(), _guess_type(values)))
    _check_unique(schema)
    return schema


def local_csv_path(uri: str) -> Path | None:
    """The local file behind ``uri`` if it is a readable local CSV (plain path or file://), else None."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and uri[1:2] == ":"):
        path = Path(uri)
    else:
        return None
    return path if path.suffix.lower() == ".csv" and path.is_file() else None


def normalise_schema(schema: Any) -> Schema:
    """Accept a schema as [{"name", "type"}], {name: type}, [name, ...] or a ``name:type,...`` string."""
    if isinstance(schema, str):
        return parse_schema_spec(schema)
    if isinstance(schema, dict):
        result = [_column(str(k), str(v)) for k, v in schema.items()]
    elif isinstance(schema, Iterable):
        result = []
        for item in schema:
            if isinstance(item, str):
                result.append(_column(item, "number"))
            elif isinstance(item, dict) and "name" in item:
                result.append(_column(str(item["name"]), str(item.get("type", "number"))))
            else:
                raise BadArgument(f"cannot read schema entry {item!r}; use {{'name': ..., 'type': ...}}")
    else:
        raise BadArgument("the schema must be a list of {'name', 'type'}, a {name: type} dict or a string")
    _check_unique(result)
    return result


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
