"""Private by default: every socket a job (and its local Ray) listens on is on loopback."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from attribution.distributed.cluster import (
    free_port,
    init_process_group,
    interface_of,
    listening_socket,
)
from attribution.settings import ClusterSettings, SettingsError
from tests.scoring.test_run import corpus_rows, write_shards
from tests.tiny import save_tiny_lm

REPOSITORY = Path(__file__).resolve().parents[2]


def listeners(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``root`` and its descendants."""
    found = set()
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for process in processes:
        try:
            name = process.name()
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    found.add((name, connection.laddr.ip, connection.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_a_fit_job_on_local_ray_listens_on_loopback_only(tmp_path):
    """The job as a user runs it: no Ray variables in the environment, two Ray workers, a
    torch.distributed rendezvous between them; its listening sockets are sampled while it runs."""
    rows = corpus_rows(9)
    model_dir = save_tiny_lm(tmp_path / "model", [r["text"] for r in rows])
    corpus = write_shards(tmp_path / "corpus", [rows[:4], rows[4:]])
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    environment["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "jobs.fit_factors", f"model.path={model_dir}", f"data.path={corpus}",
               f"output_dir={tmp_path / 'out'}", "model.device=cpu", "cluster.num_workers=2", "progress=false"]
    with (tmp_path / "stdout").open("w") as stdout, (tmp_path / "stderr").open("w") as stderr:
        job = subprocess.Popen(command, env=environment, cwd=REPOSITORY, stdout=stdout, stderr=stderr)
        root = psutil.Process(job.pid)
        seen: set[tuple[str, str, int]] = set()
        deadline = time.monotonic() + 300
        while job.poll() is None and time.monotonic() < deadline:
            seen |= listeners(root)
            time.sleep(0.2)
        if job.poll() is None:
            job.kill()
    errors = (tmp_path / "stderr").read_text()
    assert job.returncode == 0, errors[-3000:]
    assert "fitted factors on 9 sequences" in (tmp_path / "stdout").read_text()
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names, seen  # the sample did see Ray running
    assert any(name.startswith("ray::FitWorker") for name in names), seen  # and the workers' rendezvous
    exposed = sorted(entry for entry in seen if not is_loopback(entry[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert "Token authentication" not in errors and "WARNING" not in errors, errors[-2000:]


def test_the_rendezvous_store_and_gloo_listen_on_the_chosen_address_only(monkeypatch):
    """Gloo's device follows GLOO_SOCKET_IFNAME (torch ignores one given in pg_options), so the
    interface of the chosen address is named there; without it gloo would take the address the
    host name resolves to (loopback on this test machine, often not elsewhere)."""
    import torch.distributed as dist

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    before = listeners(psutil.Process())  # other tests of this process may have left some
    listener = listening_socket("127.0.0.1")
    port = listener.getsockname()[1]
    init_process_group(0, 1, "127.0.0.1", port, listener, use_gpu=False)
    try:
        opened = listeners(psutil.Process()) - before
        assert any(p == port for _, _, p in opened)
        assert all(is_loopback(address) for _, address, _ in opened), opened
        loopback = {name for name, entries in psutil.net_if_addrs().items() if any(e.address == "127.0.0.1" for e in entries)}
        assert os.environ["GLOO_SOCKET_IFNAME"] in loopback
    finally:
        dist.destroy_process_group()


def test_the_interface_of_an_address():
    assert interface_of("127.0.0.1") in {name for _, name in socket.if_nameindex()}
    assert interface_of("203.0.113.7") is None  # TEST-NET-3: on no interface


def test_free_port_binds_loopback():
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        pass


def test_workers_on_several_machines_are_told_to_open_the_rendezvous():
    """A machine is a node address: several Ray nodes on one address share its loopback."""
    from attribution.distributed.cluster import check_rendezvous_reach

    check_rendezvous_reach("127.0.0.1", ["10.0.0.1", "10.0.0.1"])
    check_rendezvous_reach("127.0.0.1", ["127.0.0.1", "127.0.0.1"])
    check_rendezvous_reach("node", ["10.0.0.1", "10.0.0.2"])
    with pytest.raises(SettingsError, match="cluster.listen=127.0.0.1: the fit workers run on 2 machines.*cluster.listen=node"):
        check_rendezvous_reach(ClusterSettings().listen, ["10.0.0.1", "10.0.0.2"])


def test_each_worker_binds_its_own_address(monkeypatch):
    """Rank 0 listens on the rendezvous address; another worker cannot bind another machine's
    address, so off loopback it binds its own node's."""
    import ray

    from attribution.distributed.cluster import worker_host

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.9")
    assert worker_host("10.0.0.1", 0) == "10.0.0.1"
    assert worker_host("10.0.0.1", 1) == "10.0.0.9"
    assert worker_host("127.0.0.1", 1) == "127.0.0.1"
