"""What a linear-regression job asks for, and what the output party receives."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Party index of each seat (CONTRACTS.md): 0 = x_owner, 1 = y_owner, 2 = the third seat.
SEAT_PARTY = {"x_owner": 0, "y_owner": 1, "model_owner": 2, "helper": 2}
X_OWNER, Y_OWNER, THIRD_SEAT = 0, 1, 2


@dataclass(frozen=True)
class LinearRegressionTask:
    """The job's configuration, the same at all three parties.

    `x_columns` are fitted in the order given (weights: intercept first, then one per column);
    `outputs_to` is the seat that alone learns the weights and metrics.
    """

    x_columns: tuple[str, ...]
    y_column: str
    outputs_to: str = "model_owner"

    def __post_init__(self) -> None:
        object.__setattr__(self, "x_columns", tuple(self.x_columns))
        if not self.x_columns:
            raise ValueError("a linear regression needs at least one x column")
        if len(set(self.x_columns)) != len(self.x_columns):
            raise ValueError(f"x columns repeat a name: {list(self.x_columns)}")
        if self.outputs_to not in SEAT_PARTY:
            raise ValueError(f"outputs_to must be one of {sorted(SEAT_PARTY)}, not {self.outputs_to!r}")

    @property
    def d(self) -> int:
        """Number of x columns (weights without the intercept)."""
        return len(self.x_columns)

    @property
    def output_party(self) -> int:
        """Party index (0, 1, 2) that receives the weights and metrics."""
        return SEAT_PARTY[self.outputs_to]


@dataclass
class LinearRegressionResult:
    """The output party's result: `weights` intercept first, `metrics` with `mse_result` and `r_squared_result`."""

    weights: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)
