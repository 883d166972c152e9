"""A job sent with `ray job submit` to a head on 127.0.0.1 that this test starts and stops itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from attribution.distributed.cluster import free_port
from tests.scoring.test_run import corpus_rows, write_shards
from tests.tiny import save_tiny_lm

REPOSITORY = Path(__file__).resolve().parents[2]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


def submit_when_the_agent_is_up(command: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess:
    """The dashboard answers before the head's job agent is ready, and a loaded machine can take
    a minute more: a submission refused for that reason (no job was created) is sent again."""
    deadline = time.monotonic() + 180
    while True:
        finished = subprocess.run(command, env=environment, cwd=REPOSITORY, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in finished.stderr or time.monotonic() > deadline:
            return finished
        time.sleep(5)


@pytest.fixture
def ray_head():
    """`ray start --head --block` in its own process group: stopping it stops only this head."""
    binaries = Path(sys.executable).parent
    environment = {
        **os.environ,
        "PATH": f"{binaries}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "OMP_NUM_THREADS": "1",
    }
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayt")  # short: Ray's socket paths must stay under 108 bytes
    head = subprocess.Popen(
        [str(binaries / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", "--include-dashboard=true",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=environment, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{dashboard}/api/version", 120)
        yield f"http://127.0.0.1:{dashboard}", environment
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


# A Ray head of its own, started and stopped: a minute of the suite, so in the slow one.
@pytest.mark.slow
def test_fit_job_sent_with_ray_job_submit(tmp_path, ray_head):
    address, environment = ray_head
    rows = corpus_rows(9)
    model_dir = save_tiny_lm(tmp_path / "model", [r["text"] for r in rows])
    corpus = write_shards(tmp_path / "corpus", [rows[:4], rows[4:]])
    command = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", f"--address={address}", "--",
        sys.executable, "-m", "jobs.fit_factors", f"model.path={model_dir}", f"data.path={corpus}",
        f"output_dir={tmp_path / 'out'}", "model.device=cpu", "cluster.num_workers=2", "progress=false",
    ]
    finished = submit_when_the_agent_is_up(command, environment)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "fitted factors on 9 sequences" in finished.stdout
    manifest = (tmp_path / "out" / "factors" / "manifest.json").read_text()
    assert '"workers": 2' in manifest
