"""`./scripts/demo` runs the whole story on this machine in under a minute and cleans up after itself."""
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_demo_completes_and_matches_plaintext_fit():
    started = time.monotonic()
    result = subprocess.run([str(ROOT / "scripts" / "demo"), "--rows", "1000"], capture_output=True, text=True,
                            timeout=150, cwd=ROOT)
    elapsed = time.monotonic() - started
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    # Progress is shown from before the approvals to the end, one line per change.
    progress = [m.group(1) for m in re.finditer(r"^\[\s*[\d.]+s\] (\w+)", out, re.M)]
    assert progress[0] == "NeedsApproval" and progress[-1] == "Completed", progress
    assert out.index("NeedsApproval") < out.index("$ cape jobs approve")
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^\s+(intercept|age|income|debt|mse_result|r_squared_result)\s+(\S+)\s+(\S+)$",
                                 out, re.M)}
    assert set(rows) == {"intercept", "age", "income", "debt", "mse_result", "r_squared_result"}
    for secure, plain in rows.values():
        assert secure == pytest.approx(plain, rel=1e-5, abs=1e-6)
    assert re.search(r"largest difference: \S+ of the largest weight", out)
    assert "buckets: 0 and 0 files" in out
    base = re.search(r"(/tmp/cape-demo-[^/\s]+)/", out).group(1)
    assert not Path(base).exists()  # everything it started is stopped and its directory removed
    assert elapsed < 60, f"demo took {elapsed:.1f} s"
