"""Benchmark of the simulated job against numpy's plaintext fit: one JSON line per case (n, d).

Each case runs in a fresh subprocess so its peak memory (`ru_maxrss`, minus the baseline after imports) is its own.
Data are generated in the case's process (not timed): independent normal columns with magnitudes spread from 1e-4
to 1e6, y a noisy linear function of them. `python -m services.jobs.linear_regression.bench [--cases 1e4x8,...]`.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

DEFAULT_CASES = [(n, d) for n in (10**4, 10**5, 10**6) for d in (8, 32)]
QUICK_CASES = [(10**4, 8), (10**5, 8)]
CASE_TIMEOUT_SECONDS = 900
NUMPY_REPEATS = 3


def parse_cases(text: str) -> list[tuple[int, int]]:
    """Parse `NxD[,NxD...]`, where N may be written 1e6 or 1000000."""
    cases = []
    for item in text.split(","):
        n_text, sep, d_text = item.strip().lower().partition("x")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r}: write a case as NxD, e.g. 1e5x8")
        try:
            n, d = int(float(n_text)), int(d_text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: N and D must be numbers, e.g. 1e5x8") from None
        if n < d + 2 or d < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: need d >= 1 and n >= d + 2")
        cases.append((n, d))
    return cases


def make_data(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Well-conditioned test data: X (n×d, column magnitudes 1e-4..1e6), y, and the true weights (intercept first)."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(-4, 6, d) if d > 1 else np.ones(1)
    x = rng.standard_normal((n, d))
    x *= scales
    x += scales * rng.uniform(-2, 2, d)  # non-zero column means, so the intercept matters
    true = np.concatenate([[rng.uniform(-5, 5)], rng.uniform(-3, 3, d) / scales])
    y = x @ true[1:]
    y += true[0]
    y += rng.standard_normal(n) * 0.1 * np.std(y)
    return x, y, true


def _rss_bytes() -> int:
    """This process's peak resident memory so far, in bytes.

    Linux's VmHWM belongs to the process's own address space. `ru_maxrss` is not usable here: it survives exec,
    so a case started by a parent holding more memory (the e2e bench holds the data) starts at the parent's peak,
    and the case's own peak, never above it, read as 0.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def run_case(n: int, d: int) -> dict:
    """Run one case in this process; return its JSON record."""
    from services.jobs.linear_regression import LinearRegressionTask, plaintext_fit, simulate_arrays
    from services.jobs.linear_regression import protocol  # noqa: F401 - imported before the baseline

    baseline = _rss_bytes()
    x, y, _ = make_data(n, d)
    task = LinearRegressionTask(tuple(f"x{i}" for i in range(d)), "y", "model_owner")

    started, cpu_started = time.perf_counter(), time.process_time()
    report = simulate_arrays(x, y, task, plaintext=False)
    job_seconds = time.perf_counter() - started
    job_cpu_seconds = time.process_time() - cpu_started  # all threads: the parties and BLAS's
    peak = _rss_bytes() - baseline  # read now: the plaintext reference fits below allocate their own copies

    xb = np.empty((n, d + 1))
    xb[:, 0] = 1.0
    xb[:, 1:] = x
    numpy_seconds = float("inf")
    for _ in range(NUMPY_REPEATS):  # the best of a few: a busy machine must not flatter the ratio
        started = time.perf_counter()
        xtx = xb.T @ xb
        xty = xb.T @ y
        numpy_weights = np.linalg.solve(xtx, xty)
        numpy_seconds = min(numpy_seconds, time.perf_counter() - started)

    del xb
    lstsq_weights, metrics = plaintext_fit(x, y)
    scale = float(np.max(np.abs(lstsq_weights)))
    input_bytes = n * (d + 1) * 8
    return {
        "n": n,
        "d": d,
        "seconds": {**report.seconds, "job": job_seconds},
        "job_cpu_seconds": job_cpu_seconds,
        "numpy_seconds": numpy_seconds,
        "ratio_to_numpy": round(job_seconds / max(numpy_seconds, 1e-9), 2),
        "bytes_sent": report.to_json()["bytes_sent"],
        "rounds": report.to_json()["rounds"],
        "input_bytes": input_bytes,
        "peak_rss_bytes": peak,
        "peak_over_input": round(peak / input_bytes, 2),
        "weight_error_vs_lstsq": float(np.max(np.abs(report.weights - lstsq_weights)) / scale),
        "numpy_normal_equations_error_vs_lstsq": float(np.max(np.abs(numpy_weights - lstsq_weights)) / scale),
        "metrics_error_vs_lstsq": {
            k: float(abs(report.metrics[k] - v) / abs(v)) for k, v in metrics.items()
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run each case in a fresh subprocess and print its JSON line; exit 1 if any case failed."""
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=parse_cases, help="cases to run, e.g. 1e4x8,1e6x32 (default: all six)")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_CASES} (a smoke run)")
    parser.add_argument("--one", nargs=2, type=int, metavar=("N", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_case(*args.one)), flush=True)
        return 0
    cases = args.cases or (QUICK_CASES if args.quick else DEFAULT_CASES)
    failed = 0
    for n, d in cases:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "services.jobs.linear_regression.bench", "--one", str(n), str(d)],
                capture_output=True, text=True, timeout=CASE_TIMEOUT_SECONDS,
            )
        except subprocess.TimeoutExpired:
            print(json.dumps({"n": n, "d": d, "error": f"timed out after {CASE_TIMEOUT_SECONDS} s"}), flush=True)
            failed += 1
            continue
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            reason = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            print(json.dumps({"n": n, "d": d, "error": reason}), flush=True)
            failed += 1
            continue
        print(lines[-1], flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
