"""Programs that read with Arrow end through os._exit (services/process_exit.py): nothing buffered may be lost."""
import subprocess
import sys

import pytest

SCRIPT = """
import logging, sys
from services.process_exit import run_then_exit
logging.basicConfig(stream=sys.stderr, format="%(message)s", level=logging.INFO)
def body():
    print("result line")  # block-buffered: stdout is a pipe here
    logging.getLogger("x").info("log line")
    return {outcome}
run_then_exit(body)
"""


@pytest.mark.parametrize(("outcome", "code"), [("3", 3), ("None", 0), ("sys.exit(2)", 2), ("sys.exit('bad')", 1)])
def test_output_is_flushed_and_the_status_kept(outcome: str, code: int) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(outcome=outcome)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == code
    assert out.stdout == "result line\n"
    assert out.stderr.splitlines()[0] == "log line"
    if outcome == "sys.exit('bad')":
        assert out.stderr.splitlines()[1] == "bad"
