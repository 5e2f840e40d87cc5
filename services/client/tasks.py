"""Job types a project can submit (pycape's names)."""
from __future__ import annotations

import math
from typing import Any

from services.client.errors import BadArgument
from services.model_location import MODEL_LOCATION_FORMS, model_location_problem
from services.client.models import DataView, Organization, org_ref, positive_seconds

DEFAULT_JOB_TIMEOUT_S = 600


def dashes_for_underscores(token: str) -> str:
    """click's `token_normalize_func` for job-type words: the CLI says `linear-regression`, the API (and so
    `cape jobs list`) `linear_regression`; a user copying either gets the same command."""
    return token.replace("_", "-")


class VerticallyPartitionedLinearRegression:
    """Linear regression of y (one organization's column) on X (another's columns), by 3-party MPC.

    ``x_train_dataview`` / ``y_train_dataview`` are ``DataView`` objects, optionally with columns selected
    (``dv[["a", "b"]]``, ``dv["target"]``): without a selection X takes every column of its schema and y the
    only column of its schema. ``model_location`` may be set only by a member of the model owner (the coordinator
    refuses it from anyone else); the model owner's worker's ``CAPE_BUCKET`` replaces it.
    """

    def __init__(
        self,
        x_train_dataview: DataView,
        y_train_dataview: DataView,
        model_owner: str | Organization | None = None,
        model_location: str | None = None,
        timeout: int = DEFAULT_JOB_TIMEOUT_S,
    ) -> None:
        for name, value in (("x_train_dataview", x_train_dataview), ("y_train_dataview", y_train_dataview)):
            if not isinstance(value, DataView):
                raise BadArgument(f"{name} must be a DataView (project.get_dataview(\"name\"), with columns selected "
                                  f"as dv[[\"a\", \"b\"]]), not {type(value).__name__} {value!r}")
        if model_owner is None:
            raise BadArgument("name the model owner organization (model_owner=...), who receives weights and metrics")
        if model_location is not None:
            problem = (model_location_problem(model_location) if isinstance(model_location, str)
                       else f"give {MODEL_LOCATION_FORMS}")
            if problem:
                raise BadArgument(f"model_location {model_location!r}: {problem}")
        if not positive_seconds(timeout):
            raise BadArgument(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.x_train_dataview = x_train_dataview
        self.y_train_dataview = y_train_dataview
        self.model_owner = model_owner
        self.model_location = model_location
        self.timeout = math.ceil(timeout)  # whole seconds; 0.5 is 1, not the 0 the coordinator refuses

    def x_columns(self) -> list[str]:
        dv = self.x_train_dataview
        columns = dv.columns or dv.column_names
        if not columns:
            raise BadArgument(f"dataview {dv.name!r} has no schema; select the x columns: dv[['a', 'b']]")
        return columns

    def y_column(self) -> str:
        dv = self.y_train_dataview
        columns = dv.columns or dv.column_names
        if len(columns) != 1:
            raise BadArgument(
                f"select exactly one y column of dataview {dv.name!r}, as dv[\"COLUMN\"] "
                f"(it has {', '.join(columns) or 'no schema'})"
            )
        return columns[0]

    def to_request(self) -> dict[str, Any]:
        """The body of ``POST /v1/projects/{project}/jobs``."""
        return {
            "type": "linear_regression",
            "x": {"dataview": self.x_train_dataview.id, "columns": self.x_columns()},
            "y": {"dataview": self.y_train_dataview.id, "column": self.y_column()},
            "model_owner": org_ref(self.model_owner),
            "model_location": self.model_location,
            "timeout": self.timeout,
        }
