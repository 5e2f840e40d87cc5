"""`cape simulate linear-regression` on a new user's files: defaults, output, and one readable line per bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from services.client.simulate import simulate, split_spec
from tests.support.client import one_error_line

CAPE = Path(sys.executable).with_name("cape")


def run(*args: str):
    """Invoke through click in this process; stdout and stderr apart."""
    return CliRunner().invoke(simulate, ["linear-regression", *args])


def run_cape(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Invoke the installed `cape` console script, as a user would."""
    return subprocess.run(
        [str(CAPE), "simulate", "linear-regression", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A user's files: features in one CSV (columns in no particular order), the target alone in a Parquet file."""
    rng = np.random.default_rng(7)
    n = 200
    height = rng.normal(170, 10, n).tolist()
    income = rng.lognormal(10, 0.5, n).tolist()
    ratio = rng.normal(0, 1e-3, n).tolist()
    noise = rng.normal(0, 1, n).tolist()
    target = [3.0 + 0.5 * height[i] - 2e-4 * income[i] + 400.0 * ratio[i] + noise[i] for i in range(n)]
    (tmp_path / "features.csv").write_text(
        "income,id,height,ratio\n"
        + "".join(f"{income[i]!r},{i},{height[i]!r},{ratio[i]!r}\n" for i in range(n))
    )
    pq.write_table(pa.table({"target": target, "other": rng.normal(size=n)}), tmp_path / "labels.parquet")
    (tmp_path / "both.csv").write_text(
        "height,target,income\n" + "".join(f"{height[i]!r},{target[i]!r},{income[i]!r}\n" for i in range(n))
    )
    return tmp_path


def test_split_spec() -> None:
    assert split_spec("x.csv:a,b") == ("x.csv", ["a", "b"])
    assert split_spec("x.csv") == ("x.csv", [])
    assert split_spec("file:///data/x.csv") == ("file:///data/x.csv", [])
    assert split_spec("file:///data/x.csv:age") == ("file:///data/x.csv", ["age"])


def test_help_explains_the_defaults() -> None:
    result = run("--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "every column of the file except the y column" in text
    assert "the file's first column" in text


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--x", "x.csv"], "error: Missing option '--y'; see --help"),
        (["--x", "x.csv:a,,b", "--y", "y.csv"], "error: 'x.csv:a,,b': empty column name; write PATH:COL1,COL2"),
        (["--x", "x.csv:a", "--y", "y.csv:t,u"], "error: --y takes one column, got 2: t, u"),
        (["--x", "x.csv:a,b,a", "--y", "y.csv:t"], "error: x columns named more than once: a"),
        (["--x", "x.csv", "--y", "y.csv", "--frobnicate"], "error: No such option '--frobnicate'; see --help"),
    ],
)
def test_usage_mistakes_exit_2_with_one_line(args: list[str], expected: str) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert one_error_line(result.stderr) == expected


def test_a_column_without_a_name_in_the_file_is_a_data_error(tmp_path: Path, monkeypatch) -> None:
    """Its weight would have printed with a blank name."""
    (tmp_path / "x.csv").write_text(",b,t\n1,2,1\n2,5,3\n3,1,2\n4,4,5\n5,0,4\n")
    monkeypatch.chdir(tmp_path)
    result = run("--x", "x.csv", "--y", "x.csv:t")
    assert result.exit_code == 1
    assert one_error_line(result.stderr) == ("error: x.csv: the header leaves column 1 without a name; name every "
                                             "column, or give the x columns (--x FILE:COL,...)")


def test_a_column_named_twice_in_the_file_is_a_data_error(tmp_path: Path, monkeypatch) -> None:
    """Named twice in the file's header: exit 1 naming the file; named twice in --x: a usage mistake, exit 2."""
    (tmp_path / "xdup.csv").write_text("age,b,age\n1,2,3\n2,5,1\n3,1,4\n4,4,4\n5,0,2\n")
    (tmp_path / "y.csv").write_text("t\n1\n3\n2\n5\n4\n")
    monkeypatch.chdir(tmp_path)
    result = run("--x", "xdup.csv", "--y", "y.csv")
    assert result.exit_code == 1
    assert one_error_line(result.stderr) == (
        "error: xdup.csv: the file names 'age' more than once; give each column its own name")
    result = run("--x", "xdup.csv:b,age,b", "--y", "y.csv")
    assert result.exit_code == 2
    assert one_error_line(result.stderr) == "error: x columns named more than once: b"


def test_missing_file_and_column_exit_1(files: Path) -> None:
    result = run("--x", str(files / "nope.csv:a"), "--y", str(files / "labels.parquet"))
    assert result.exit_code == 1
    assert one_error_line(result.stderr).startswith(f"error: {files / 'nope.csv'}: no such file")
    result = run("--x", f"{files / 'features.csv'}:height,weight", "--y", str(files / "labels.parquet"))
    assert result.exit_code == 1
    assert one_error_line(result.stderr) == (
        f"error: {files / 'features.csv'}: no column 'weight'; the file has 'income', 'id', 'height', 'ratio'"
    )


def test_bad_values_through_the_installed_cape(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a,b\n1,2\n3,4\n5,six\n7,8\n")
    (tmp_path / "y.csv").write_text("t\n1\n2\nnan\n4\n")
    result = run_cape("--x", "x.csv", "--y", "y.csv", cwd=tmp_path)
    assert result.returncode == 1
    assert one_error_line(result.stderr) == "error: x.csv: column 'b' row 3: the value is not a number"
    result = run_cape("--x", "x.csv:a", "--y", "y.csv", cwd=tmp_path)
    assert result.returncode == 1
    assert one_error_line(result.stderr) == (
        "error: y.csv: column 't' row 3: the value is NaN (not a number); every value must be a finite number"
    )
    assert result.stdout == ""


def assert_matches_plaintext(doc: dict) -> None:
    largest = max(abs(w) for w in doc["plaintext_weights"])
    assert doc["max_abs_error"] <= 1e-6 * largest
    assert max(abs(a - b) for a, b in zip(doc["weights"], doc["plaintext_weights"])) == pytest.approx(
        doc["max_abs_error"], rel=1e-12, abs=1e-300)
    for key in ("mse_result", "r_squared_result"):
        assert doc["metrics"][key] == pytest.approx(doc["plaintext_metrics"][key], rel=1e-6)


def test_json_run_on_a_users_files(files: Path) -> None:
    result = run_cape("--x", "features.csv:ratio,height,income", "--y", "labels.parquet:target", "--json", cwd=files)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)  # exactly one JSON object, nothing else
    assert {"weights", "metrics", "plaintext_weights", "max_abs_error", "seconds", "bytes_sent", "rounds"} <= set(doc)
    assert doc["names"] == ["intercept", "ratio", "height", "income"]
    assert len(doc["weights"]) == 4 and set(doc["metrics"]) == {"mse_result", "r_squared_result"}
    assert_matches_plaintext(doc)
    # The fitted model is the one the data were made from (intercept 3, slopes 400, 0.5, -2e-4), within noise.
    assert doc["weights"][1:] == pytest.approx([400.0, 0.5, -2e-4], rel=0.2)
    assert set(doc["bytes_sent"]) == set(doc["rounds"]) == {"x_owner", "y_owner", "model_owner"}
    # The x-owner streams its masked n×d matrix: at least 8 bytes per value.
    assert doc["bytes_sent"]["x_owner"] >= 200 * 3 * 8
    assert all(r >= 1 for r in doc["rounds"].values())
    assert {"load", "protocol", "plaintext"} <= set(doc["seconds"])


def test_default_columns_from_one_file(files: Path) -> None:
    result = run("--x", str(files / "both.csv"), "--y", f"{files / 'both.csv'}:target", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["names"] == ["intercept", "height", "income"]  # every column but y, in file order
    assert_matches_plaintext(doc)
    result = run("--x", str(files / "both.csv"), "--y", str(files / "both.csv"), "--json")
    assert json.loads(result.stdout)["names"] == ["intercept", "target", "income"]  # y = the first column


def test_the_job_type_as_the_api_spells_it(files: Path) -> None:
    """`cape jobs list` shows `linear_regression`; a user copying it gets the same command."""
    result = CliRunner().invoke(simulate, ["linear_regression", "--x", str(files / "both.csv"),
                                           "--y", f"{files / 'both.csv'}:target", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["names"] == ["intercept", "height", "income"]


def test_default_columns_of_a_header_with_spaces_after_its_commas(tmp_path: Path) -> None:
    """`a, b, y` is a common hand-written header: the defaults take its names trimmed (as a dataview's schema
    does), so y is set aside from x, not regressed on itself."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=50), rng.normal(size=50)
    y = 2 * a - b + rng.normal(0, 0.1, 50)
    rows = "".join(f"{float(a[i])!r}, {float(b[i])!r}, {float(y[i])!r}\n" for i in range(50))
    (tmp_path / "sp.csv").write_text("a, b, y\n" + rows)
    result = run("--x", str(tmp_path / "sp.csv"), "--y", f"{tmp_path / 'sp.csv'}:y", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["names"] == ["intercept", "a", "b"]
    assert doc["weights"][1:] == pytest.approx([2.0, -1.0], abs=0.1)
    assert_matches_plaintext(doc)
    (tmp_path / "twice.csv").write_text("a, a ,y\n1,2,3\n")
    result = run("--x", str(tmp_path / "twice.csv"), "--y", f"{tmp_path / 'twice.csv'}:y")
    assert result.exit_code == 1
    assert one_error_line(result.stderr) == (f"error: {tmp_path / 'twice.csv'}: the file names 'a' more than once; "
                                             "give each column its own name")


def test_text_output_names_the_weights(files: Path) -> None:
    result = run("--x", f"file://{files / 'features.csv'}:height", "--y", str(files / "labels.parquet"))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "weights (secure fit; plaintext fit):"
    assert lines[1].split()[0] == "intercept" and lines[2].split()[0] == "height"
    assert any(line.startswith("  r_squared_result") for line in lines)
    assert any(line.startswith("largest weight difference from the plaintext fit: ") for line in lines)


def test_rows_that_do_not_match(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a\n" + "".join(f"{i}\n" for i in range(30)))
    (tmp_path / "y.csv").write_text("t\n" + "".join(f"{i % 7}\n" for i in range(29)))
    result = run_cape("--x", "x.csv", "--y", "y.csv", cwd=tmp_path)
    assert result.returncode == 1
    assert one_error_line(result.stderr) == (
        "error: x.csv has 30 rows but y.csv has 29; the x and y data must have the same rows, in the same order"
    )


@pytest.mark.parametrize(
    ("x_text", "y_text", "expected"),
    [
        ("a,b\n1,2\n3,4\n", "t\n1\n2\n",
         "error: x.csv: 2 rows for 2 x columns; a fit needs at least 3 rows (one more than the number of x columns, "
         "for the intercept)"),
        ("a,b\n1,5\n2,5\n3,5\n4,5\n", "t\n1\n3\n2\n5\n",
         "error: x.csv: column 'b' is constant (the intercept already fits a constant); drop or replace those "
         "columns, the weights are not determined"),
        ("a,b,c\n1,2,3\n2,1,3\n3,5,8\n4,0,4\n5,5,10\n", "t\n1\n3\n2\n5\n4\n",
         "error: x.csv: columns 'a', 'b', 'c' are collinear (one is, or nearly is, a linear combination of the "
         "others and the intercept); drop or replace those columns, the weights are not determined"),
        ("a\n1\n2\n3\n", "t\n4\n4\n4\n",
         "error: y.csv: column 't' is constant (all its values are equal); a regression needs a target that varies"),
        ("a\n1\n2e101\n3\n", "t\n1\n2\n3\n",
         "error: x.csv: column 'a' row 2: the value's magnitude is above 1e+100, outside the secure computation's "
         "fixed-point range even after its internal scaling; rescale the column (e.g. to other units)"),
        ("a\n1\n2\n3\n", "t\n1e-120\n0\n-3e-120\n",
         "error: y.csv: column 't': every value's magnitude is below 1e-100 (but not all are 0), outside the secure "
         "computation's fixed-point range even after its internal scaling; rescale the column (e.g. to other units)"),
    ],
    ids=["too-few-rows", "constant-column", "collinear-columns", "constant-y", "too-large", "too-small"],
)
def test_data_the_fit_cannot_use(tmp_path: Path, monkeypatch, x_text: str, y_text: str, expected: str) -> None:
    (tmp_path / "x.csv").write_text(x_text)
    (tmp_path / "y.csv").write_text(y_text)
    monkeypatch.chdir(tmp_path)
    result = run("--x", "x.csv", "--y", "y.csv")
    assert result.exit_code == 1
    assert one_error_line(result.stderr) == expected
    assert result.stdout == ""
