"""bin/dev stops everything it started on Ctrl-C, piped or not (issue 15, "also seen").

`bin/dev 2>&1 | tail -n 40`, then Ctrl-C, used to leave honcho, gunicorn, the consumer and the
simulator running: the terminal's SIGINT killed `tail` too, honcho's "SIGINT received" then hit a
broken pipe, and honcho died before it stopped its processes (each in a session of its own).
The test plays the terminal: bin/dev in a session of its own behind a pipe, SIGINT to the whole
foreground process group once the web answers, then every process it started must be gone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.faults.test_processes import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc"),
    pytest.mark.skipif(not (Path(sys.prefix) / "bin" / "honcho").exists(), reason="needs honcho (the test extra has it)"),
]


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of a live process, None once it is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    state, ppid, start = fields[0], int(fields[1]), fields[19]
    return None if state in ("Z", "X") else (ppid, state, start)


def descendants(root: int) -> dict[int, str]:
    """Every live process below `root` (any session), by pid, with its start time."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents.setdefault(stat[0], []).append(int(entry.name))
            starts[int(entry.name)] = stat[2]
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        for child in parents.get(frontier.pop(), []):
            if child not in found:
                found[child] = starts[child]
                frontier.append(child)
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:100]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def survivors(started: dict[int, str]) -> list[str]:
    """The processes of `started` still running (the same process: same start time)."""
    alive = []
    for pid, start in started.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == start:
            alive.append(f"{pid} {_command(pid)}")
    return alive


def press_ctrl_c(shell: subprocess.Popen, started: dict[int, str]) -> list[str]:
    """SIGINT to the shell's process group, as a terminal's Ctrl-C; what still runs after a
    generous minute (gunicorn and the consumer drain before they exit)."""
    os.killpg(shell.pid, signal.SIGINT)
    deadline = time.monotonic() + 60
    while survivors(started) and time.monotonic() < deadline:
        time.sleep(0.5)
    return survivors(started)


def kill_what_is_left(shell: subprocess.Popen, started: dict[int, str]) -> None:
    """Never leave a stray server behind, whatever the test's outcome."""
    for pid in started:
        stat = _stat(pid)
        if stat is not None and stat[2] == started[pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if shell.poll() is None:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(timeout=10)


def bin_dev_env(tmp_path: Path, web_port: int, simulator_port: int, **extra: str) -> dict[str, str]:
    """The environment of a `bin/dev` run by a test: this machine's own, minus every setting
    that would take development mode away (bin/dev must run with no configuration at all), on
    free ports, with an instance folder of its own and the installed venv (no pip run)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DATABASE_URL", "REDIS_URL", "TWILIO_", "TEST_", "NOTIFY_", "EVENTS_", "SENDGRID_",
                                  "EMAIL_", "DEV_WEB_URL", "SECRET_KEY", "PUBLIC_URL"))}
    env.update(VENV=sys.prefix, BIN_DEV_SKIP_INSTALL="1", PORT=str(web_port), SIMULATOR_PORT=str(simulator_port),
               INSTANCE_PATH=str(tmp_path / "instance"), WEB_CONCURRENCY="1", WORKER_THREADS="2",
               PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def start_bin_dev(command: str, env: dict[str, str], tmp_path: Path, out: Path) -> subprocess.Popen:
    """`command` (bin/dev, or a pipeline from it) run by bash from the repository, its output into
    `out`, in a session of its own, as a terminal's shell gives each pipeline a process group."""
    return subprocess.Popen(["bash", "-c", f"cd {ROOT} && {command}"], env=env, cwd=tmp_path,
                            start_new_session=True, stdout=open(out, "wb"), stderr=subprocess.STDOUT)


def wait_until_answering(shell: subprocess.Popen, started: dict[int, str], *urls: str) -> None:
    """Wait (up to 240 s: a busy machine) until every one of `urls` answers 200, noting the
    processes bin/dev started in `started` meanwhile (for kill_what_is_left)."""
    def up() -> bool:
        started.update(descendants(shell.pid))
        try:
            return all(requests.get(url, timeout=2).status_code == 200 for url in urls)
        except requests.RequestException:
            return False

    wait_until(up, timeout=240, what=f"bin/dev to answer {', '.join(urls)}")


@pytest.mark.parametrize("pipeline", ["bin/dev 2>&1 | tail -n 5", "bin/dev 2>&1 | tee dev.log >/dev/null", "bin/dev"])
def test_ctrl_c_stops_everything_bin_dev_started(pipeline, tmp_path):
    web_port, simulator_port = free_port(), free_port()
    env = bin_dev_env(tmp_path, web_port, simulator_port)
    shell = start_bin_dev(pipeline.replace("dev.log", str(tmp_path / "dev.log")), env, tmp_path, tmp_path / "out.log")
    started: dict[int, str] = {}
    try:
        wait_until_answering(shell, started, f"http://127.0.0.1:{web_port}/healthz")
        time.sleep(1)
        started.update(descendants(shell.pid))
        names = " ".join(_command(pid) for pid in started)
        assert "honcho" in names and "gunicorn" in names and "huey_consumer" in names and "simulator" in names

        left = press_ctrl_c(shell, started)
        assert not left, f"still running after Ctrl-C ({pipeline}): {left}"
        shell.wait(timeout=30)
    finally:
        kill_what_is_left(shell, started)
