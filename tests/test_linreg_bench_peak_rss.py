"""The engine bench's peak memory is the case's own, even when its parent holds much more (as the e2e bench does)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np


def test_peak_rss_is_measured_when_the_parent_is_larger():
    held = np.ones(50_000_000)  # 400 MB in this (parent) process: more than the case's own peak
    held[::4096] = 2.0  # touch every page so it is resident
    n, d = 20_000, 8
    result = subprocess.run([sys.executable, "-m", "services.jobs.linear_regression.bench", "--one", str(n), str(d)],
                            capture_output=True, text=True, timeout=120)
    del held
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    input_bytes = n * (d + 1) * 8
    # the case holds X and y (input_bytes) and the parties' shares: its own peak is above its input, and far
    # below the parent's 400 MB
    assert input_bytes < record["peak_rss_bytes"] < 300_000_000
    assert record["peak_over_input"] >= 1.0
