"""The Dockerfile lints clean and runs exactly what the tests run."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path


from services.worker.config import DEFAULT_SPOOL_DIR, DEFAULT_STATE_DIR
from tests.support.workers import WORKER_COMMAND

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def one(keyword: str) -> str:
    found = [rest for key, rest in instructions() if key == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def test_hadolint_passes_at_warning_threshold():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    result = subprocess.run([hadolint, "--failure-threshold", "warning", "-f", "json", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0, findings
    assert [f for f in findings if f["level"] in ("error", "warning")] == []


def test_cmd_is_what_the_tests_run():
    assert json.loads(one("CMD")) == WORKER_COMMAND


def test_healthcheck_reads_program_states():
    healthcheck = one("HEALTHCHECK")
    assert json.loads(healthcheck.split("CMD", 1)[1]) == ["cape-worker", "health"]


def test_slim_python_non_root_and_volumes():
    assert one("FROM") == "python:3.11-slim"
    user = one("USER").split(":")[0]
    assert user not in ("root", "0")
    assert sorted(json.loads(one("VOLUME"))) == sorted([DEFAULT_SPOOL_DIR, DEFAULT_STATE_DIR])


def test_conf_location_matches_the_copied_conf():
    env = one("ENV")
    conf = re.search(r"CAPE_WORKER_CONF=(\S+)", env).group(1)
    copies = [rest.split() for key, rest in instructions() if key == "COPY"]
    workdir = one("WORKDIR")
    assert ["conf", "./conf"] in copies
    assert conf == f"{workdir}/conf/supervisord.conf"
    assert (ROOT / "conf" / "supervisord.conf").is_file()


def test_dockerignore_keeps_secrets_and_venv_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".env", ".venv", ".git"):
        assert entry in ignored
