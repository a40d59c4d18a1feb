"""bin/dev prints a link that signs the development operator in: one click from the terminal to
the dashboard, through the real web process bin/dev started."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import requests

from tests.devtools.test_bin_dev import (bin_dev_env, descendants, kill_what_is_left, press_ctrl_c, start_bin_dev,
                                        wait_until_answering)
from tests.faults.test_processes import free_port


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc"),
    pytest.mark.skipif(not (Path(sys.prefix) / "bin" / "honcho").exists(), reason="needs honcho (the test extra has it)"),
]


def test_bin_dev_prints_a_one_time_link_that_signs_in(tmp_path):
    web_port, simulator_port = free_port(), free_port()
    env = bin_dev_env(tmp_path, web_port, simulator_port)
    out = tmp_path / "out.log"
    shell = start_bin_dev("bin/dev", env, tmp_path, out)
    started: dict[int, str] = {}
    try:
        wait_until_answering(shell, started, f"http://127.0.0.1:{web_port}/healthz")
        found = re.search(r"The dashboard, signed in:\s+(\S+)", out.read_text(errors="replace"))
        assert found, out.read_text(errors="replace")[-2000:]
        link = found.group(1)
        assert link.startswith(f"http://127.0.0.1:{web_port}/dashboard/sign-in/link/")
        browser = requests.Session()
        browser.trust_env = False
        page = browser.get(link, timeout=10)
        assert page.status_code == 200 and "Sign out developer@example.com" in page.text
        assert page.url == f"http://127.0.0.1:{web_port}/dashboard/"
        assert requests.get(link, timeout=10).status_code == 410  # once
        started.update(descendants(shell.pid))
        assert not press_ctrl_c(shell, started)
    finally:
        kill_what_is_left(shell, started)
