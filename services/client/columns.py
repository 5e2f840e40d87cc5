"""Column lists as the CLI takes them: separated by commas, a name that holds a comma quoted as in a CSV header
(`a, "b,c"`)."""
from __future__ import annotations

import csv

from services.client.errors import BadArgument


def split_columns(text: str, where: str) -> list[str]:
    """`a, "b,c"` -> ["a", "b,c"]; empty entries stay (as "") for the caller to refuse. `where` names the option
    or value in the error an unclosed quote gives."""
    try:
        row = next(csv.reader([text], skipinitialspace=True, strict=True), None)
    except csv.Error as exc:
        raise BadArgument(f"{where}: {exc}; quote a name that holds a comma: \"A,B\",C") from None
    return [name.strip() for name in row or [""]]
