"""The Python SDK (pycape's shape) and the `cape` command line."""
from services.client.errors import (
    ApiError,
    BadArgument,
    CapeError,
    CoordinatorUnreachable,
    NotAllowed,
    NotConfigured,
    ResultsUnavailable,
)
from services.client.models import DataView, Job, Organization, Project
from services.client.sdk import Cape
from services.client.tasks import VerticallyPartitionedLinearRegression

__all__ = [
    "ApiError", "BadArgument", "Cape", "CapeError", "CoordinatorUnreachable", "DataView", "Job", "NotAllowed",
    "NotConfigured", "Organization", "Project", "ResultsUnavailable", "VerticallyPartitionedLinearRegression",
]
