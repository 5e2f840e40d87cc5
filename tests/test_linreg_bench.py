"""The benchmark harness: one JSON line per case, each from its own process, with the fields the note quotes."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from services.jobs.linear_regression.bench import make_data, parse_cases


def test_parse_cases() -> None:
    assert parse_cases("1e4x8, 100000x32") == [(10_000, 8), (100_000, 32)]
    with pytest.raises(argparse.ArgumentTypeError, match="write a case as NxD"):
        parse_cases("1e4")
    with pytest.raises(argparse.ArgumentTypeError, match="need d >= 1 and n >= d \\+ 2"):
        parse_cases("10x9")


def test_generated_data_spans_the_promised_magnitudes() -> None:
    x, y, true = make_data(1000, 8)
    magnitudes = abs(x).max(axis=0)
    assert magnitudes.min() < 1e-3 and magnitudes.max() > 1e6
    assert y.shape == (1000,) and true.shape == (9,)


def test_cases_print_one_json_line_each() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "services.jobs.linear_regression.bench", "--cases", "3000x4,500x2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["n"], r["d"]) for r in records] == [(3000, 4), (500, 2)]
    for record in records:
        assert record["weight_error_vs_lstsq"] < 1e-6
        assert max(record["metrics_error_vs_lstsq"].values()) < 1e-6
        assert record["input_bytes"] == record["n"] * (record["d"] + 1) * 8
        assert record["peak_rss_bytes"] > 0 and record["numpy_seconds"] > 0
        assert {"prepare", "product", "job"} <= set(record["seconds"])
        assert set(record["bytes_sent"]) == {"x_owner", "y_owner", "model_owner"}
        assert record["bytes_sent"]["x_owner"] >= record["n"] * record["d"] * 8  # the masked X streams once
        # The simulation's CPU time (its parties' and BLAS's threads) fits in its wall time on this machine's cores.
        assert 0 < record["job_cpu_seconds"] <= record["seconds"]["job"] * (os.cpu_count() or 1) + 0.02
        assert record["ratio_to_numpy"] == pytest.approx(record["seconds"]["job"] / record["numpy_seconds"], rel=0.02)
