"""One sweep per output directory: refusal naming the holder, stale locks, break_lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from attribution.data.corpus import DataError
from attribution.settings import SettingsError
from attribution.sweep import SweepLock, SweepLocked
from attribution.sweep.lock import LOCK_NAME
from tests.sweep.helpers import sweep


def write_lock(path, pid: int, host: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host, "started": "2025-01-01T02:00:00+00:00",
                                "command": "jobs.sweep", "token": "other"}))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_sweep_refuses_while_one_holds_the_lock(world):
    world.arrive(0)
    lock_path = world.output / LOCK_NAME
    with SweepLock(lock_path):
        with pytest.raises(SweepLocked) as refused:
            sweep(world, "2025-01-01")
        message = str(refused.value)
        assert str(lock_path) in message and f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert "is running" in message and "sweep.break_lock=true" in message
        assert not (world.output / "sweep_state.json").exists()
    assert not lock_path.exists()  # released by its holder
    assert sweep(world, "2025-01-01").plan.new
    assert not lock_path.exists()  # released by the sweep


def test_a_lock_is_released_when_the_sweep_fails(world):
    world.arrive(0)
    with pytest.raises(SettingsError, match="sweep.date"):
        sweep(world, "not-a-date")
    (world.corpus / "shard-0.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="shard-0.parquet") as failed:  # a data error fails at once, not retried
        sweep(world, "2025-01-01")
    # Named by its real path, not the link a night stages it under (the run record it names is real).
    assert str(world.corpus / "shard-0.parquet") in str(failed.value) and "/corpus/shard" not in str(failed.value).replace(
        str(world.corpus / "shard-0.parquet"), "")
    assert not (world.output / LOCK_NAME).exists()


def test_a_stale_lock_on_this_host_is_taken_over(tmp_path):
    path = tmp_path / LOCK_NAME
    pid = dead_pid()
    write_lock(path, pid, socket.gethostname())
    with SweepLock(path) as lock:
        assert any("stale" in m and f"pid {pid}" in m for m in lock.messages)
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_a_lock_from_another_host_refuses_until_broken(tmp_path):
    path = tmp_path / LOCK_NAME
    write_lock(path, 12345, "another-host")
    with pytest.raises(SweepLocked, match="another-host.*cannot be checked from this host.*delete"):
        SweepLock(path).acquire()
    path.write_text("{half-written")
    with pytest.raises(SweepLocked, match="owner cannot be read"):
        SweepLock(path).acquire()
    write_lock(path, 12345, "another-host")
    with SweepLock(path, break_lock=True) as lock:
        assert any("break_lock" in m and "another-host" in m for m in lock.messages)
    assert not path.exists()


def test_release_leaves_a_lock_that_another_sweep_took_over(tmp_path):
    path = tmp_path / LOCK_NAME
    lock = SweepLock(path)
    lock.acquire()
    write_lock(path, 999, "another-host")  # e.g. broken and retaken by an operator
    lock.release()
    assert json.loads(path.read_text())["host"] == "another-host"
