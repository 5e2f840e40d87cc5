"""The demo behind `./scripts/demo`: the whole system on this machine, on 127.0.0.1, in under a minute.

Starts cape-server (coordinator + broker) with a temporary data directory, creates three organizations (bank holds
the features, insurer holds the target and receives the model, helper takes the third seat), writes sample data,
registers the dataviews, starts one worker per organization with `cape-worker run` (each with its own spool, state
and file:// bucket), submits a linear regression with the `cape` CLI, follows its
progress (`cape jobs watch`) while both data owners approve it, prints the weights and metrics beside a plaintext fit, and stops everything it started.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ORGS = {"bank": "x-owner (features)", "insurer": "y-owner and model owner (target)", "helper": "helper (third seat)"}
COLUMNS = ["age", "income", "debt"]
TARGET = "claims"
START_TIMEOUT = 30.0
JOB_TIMEOUT = 45.0


def say(text: str) -> None:
    print(f"\033[1m==>\033[0m {text}" if sys.stdout.isatty() else f"==> {text}", flush=True)


class Demo:
    def __init__(self, base: Path, rows: int) -> None:
        self.base = base
        self.rows = rows
        self.server: subprocess.Popen[str] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.url = ""
        self.orgs: dict[str, dict] = {}

    # ---- processes ------------------------------------------------------------------------------------------
    def start_server(self) -> None:
        log = open(self.base / "server.log", "a")
        self.server = subprocess.Popen(
            [str(BIN / "cape-server"), "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir",
             str(self.base / "server")], stdout=subprocess.PIPE, stderr=log, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.server.stdout], daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.url:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise SystemExit(f"cape-server did not start within {START_TIMEOUT:.0f} s; see {self.base}/server.log")
            if line.startswith("cape-server listening on "):
                self.url = line.split("listening on ", 1)[1].strip()
        say(f"cape-server (coordinator + broker) listening on {self.url}")

    def start_worker(self, label: str) -> None:
        folder = self.base / label
        folder.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPE_", "AWS_"))}
        env.update({"CAPE_TOKEN": self.orgs[label]["organization_token"], "CAPE_COORDINATOR": self.url,
                    "CAPE_WORKER_NAME": label, "CAPE_SPOOL_DIR": str(folder / "spool"),
                    "CAPE_STATE_DIR": str(folder / "state"), "CAPE_BUCKET": (folder / "bucket").as_uri(),
                    "CAPE_POLL_INTERVAL": "0.3", "PYTHONUNBUFFERED": "1",
                    "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"})
        with open(folder / "worker.log", "ab") as out:
            self.workers[label] = subprocess.Popen([str(BIN / "cape-worker"), "run"], env=env, stdout=out,
                                                   stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)

    def wait_workers_running(self) -> None:
        from services.worker.health import PROGRAMS, SupervisorUnavailable, program_states

        deadline = time.monotonic() + START_TIMEOUT
        pending = set(self.workers)
        while pending and time.monotonic() < deadline:
            for label in sorted(pending):
                if self.workers[label].poll() is not None:
                    raise SystemExit(f"the {label} worker exited; see {self.base / label / 'worker.log'}")
                try:
                    states = program_states(self.base / label / "state" / "run")
                except SupervisorUnavailable:
                    continue
                if len(states) == len(PROGRAMS) and set(states.values()) == {"RUNNING"}:
                    pending.discard(label)
            time.sleep(0.2)
        if pending:
            raise SystemExit(f"workers not running after {START_TIMEOUT:.0f} s: {sorted(pending)}")

    def stop(self) -> None:
        for label, proc in self.workers.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for label, proc in self.workers.items():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if self.server and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.server.kill()

    # ---- the cape CLI ---------------------------------------------------------------------------------------
    def cape(self, label: str, *args: str) -> str:
        """Run `cape ARGS` as LABEL's admin; its output, or exit with its error."""
        shown = self._show(label, args)
        result = subprocess.run([str(BIN / "cape"), *args], env=self._env(label), text=True, timeout=120,
                                capture_output=True)
        if result.returncode != 0:
            raise SystemExit(f"`cape {shown}` failed ({result.returncode}): {(result.stderr or '').strip()}")
        return result.stdout

    def cape_in_background(self, label: str, *args: str) -> "Relayed":
        """Start `cape ARGS` as LABEL's admin, its output relayed to this terminal line by line."""
        self._show(label, args)
        return Relayed(subprocess.Popen([str(BIN / "cape"), *args], env=self._env(label), text=True,
                                        stdout=subprocess.PIPE))

    def _env(self, label: str) -> dict[str, str]:
        return {**os.environ, "CAPE_COORDINATOR": self.url, "CAPE_TOKEN": self.orgs[label]["user_token"],
                "XDG_CONFIG_HOME": str(self.base / label / "cli-config")}

    @staticmethod
    def _show(label: str, args: tuple[str, ...]) -> str:
        shown = " ".join(args)
        print(f"    [{label}] $ cape {shown}", flush=True)
        return shown

    # ---- the story ------------------------------------------------------------------------------------------
    def run(self) -> int:
        started = time.monotonic()
        self.start_server()
        for label, role in ORGS.items():
            out = subprocess.run([str(BIN / "cape-server"), "admin", "create-org", label, "--admin-email",
                                  f"admin@{label}.example", "--data-dir", str(self.base / "server"), "--json"],
                                 capture_output=True, text=True, timeout=60, check=True).stdout
            self.orgs[label] = json.loads(out)
            say(f"organization {label}: {role}")

        x, y = sample_data(self.rows)
        x_csv = write_csv(self.base / "bank" / "data" / "features.csv", COLUMNS, x)
        y_csv = write_csv(self.base / "insurer" / "data" / "target.csv", [TARGET], y[:, None])
        say(f"sample data: {self.rows} rows; bank has {', '.join(COLUMNS)}, insurer has {TARGET}")

        say("project, helper and dataviews")
        self.cape("bank", "projects", "create", "demo", "--name", "Claims model")
        self.cape("bank", "projects", "add-org", "demo", "insurer")
        self.cape("bank", "projects", "set-helper", "demo", "helper")
        self.cape("helper", "projects", "join", "demo", "helper")  # its worker takes the third seat: it agrees
        self.cape("bank", "dataviews", "add", "demo", "features", x_csv.as_uri(), "--schema-from-file", str(x_csv))
        self.cape("insurer", "dataviews", "add", "demo", "target", y_csv.as_uri(), "--schema-from-file", str(y_csv))

        say("starting three workers: cape-worker run (supervisord: poller, messenger, runner, uploader)")
        for label in ORGS:
            self.start_worker(label)
        self.wait_workers_running()

        say("submitting the job")
        job = json.loads(self.cape("bank", "jobs", "submit", "demo", "linear-regression", "--x",
                                   f"features:{','.join(COLUMNS)}", "--y", f"target:{TARGET}", "--model-owner",
                                   "insurer", "--timeout", "120", "--json"))
        job_id = job["id"]
        # Watched from the start, so its progress shows from NeedsApproval on: the job itself takes about a second.
        say(f"job {job_id}: following its progress while each data owner approves it")
        watch = self.cape_in_background("insurer", "jobs", "watch", job_id, "--interval", "0.2", "--timeout",
                                        str(JOB_TIMEOUT))
        try:
            watch.first_line.wait(timeout=30)  # NeedsApproval shows before the approvals
            self.cape("bank", "jobs", "approve", job_id)
            self.cape("insurer", "jobs", "approve", job_id)
            code = watch.wait(timeout=JOB_TIMEOUT + 30)
        finally:
            watch.kill()
        if code != 0:
            raise SystemExit(f"the job did not complete (`cape jobs watch` exited {code})")

        results = json.loads(self.cape("insurer", "jobs", "results", job_id, "--json"))
        secure = np.asarray(results["weights"], dtype=float)
        plain, plain_metrics = plaintext_fit(x, y)
        say("weights (secure 3-party fit beside numpy's plaintext least squares on the same data)")
        print(f"    {'':<12}{'secure':>22}{'plaintext':>22}")
        for name, a, b in zip(["intercept", *COLUMNS], secure, plain):
            print(f"    {name:<12}{a:>22.10f}{b:>22.10f}")
        for key in ("mse_result", "r_squared_result"):
            print(f"    {key:<18}{results['metrics'][key]:>16.10f}{plain_metrics[key]:>22.10f}")
        error = float(np.max(np.abs(secure - plain)) / np.max(np.abs(plain)))
        weights_file = self.base / "insurer" / "bucket" / job_id / "regression_weights.csv"
        say(f"largest difference: {error:.2e} of the largest weight")
        say(f"the insurer's worker wrote {weights_file} (pycape's layout); the bank's and helper's buckets: "
            f"{sum(1 for _ in (self.base / 'bank' / 'bucket').rglob('*.csv'))} and "
            f"{sum(1 for _ in (self.base / 'helper' / 'bucket').rglob('*.csv'))} files")
        say(f"done in {time.monotonic() - started:.1f} s")
        return 0 if error < 1e-6 else 1


class Relayed:
    """A process whose output this script prints line by line as it comes (so it can tell when the first came)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.first_line = threading.Event()
        self._relay = threading.Thread(target=self._run, daemon=True)
        self._relay.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            print(line, end="", flush=True)
            self.first_line.set()
        self.first_line.set()  # it ended without a line: nobody should wait for one

    def wait(self, timeout: float) -> int:
        """The exit code, once every line it wrote is printed."""
        code = self.proc.wait(timeout=timeout)
        self._relay.join(timeout=10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def sample_data(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Features at very different scales (no pre-scaling needed) and a noisy linear target."""
    rng = np.random.default_rng(2024)
    age = rng.uniform(18, 80, rows)
    income = rng.lognormal(10.5, 0.4, rows)
    debt = rng.uniform(0, 1, rows) * income * 0.3
    x = np.column_stack([age, income, debt])
    y = 120.0 + 4.2 * age - 0.0021 * income + 0.013 * debt + rng.normal(0, 15, rows)
    return x, y


def plaintext_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    design = np.column_stack([np.ones(len(x)), x])
    weights = np.linalg.lstsq(design, y, rcond=None)[0]
    residual = y - design @ weights
    mse = float(residual @ residual / len(y))
    return weights, {"mse_result": mse, "r_squared_result": 1 - mse * len(y) / float(((y - y.mean()) ** 2).sum())}


def write_csv(path: Path, header: list[str], data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, data, delimiter=",", header=",".join(header), comments="", fmt="%.10g")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="sample rows (default 2000)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, spools)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="cape-demo-"))
    demo = Demo(base, args.rows)
    code = 1
    try:
        code = demo.run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    except (SystemExit, Exception) as exc:  # noqa: BLE001 -- any failure: show the workers' last lines
        print(f"demo failed: {exc}", file=sys.stderr)
        for label in ORGS:
            log = base / label / "worker.log"
            if log.exists():
                print(f"--- last lines of the {label} worker ---", file=sys.stderr)
                print("\n".join(log.read_text(errors="replace").splitlines()[-15:]), file=sys.stderr)
        code = 1
    finally:
        say("stopping the workers and cape-server")
        demo.stop()
        if args.keep or code != 0:
            print(f"    logs and spools kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
