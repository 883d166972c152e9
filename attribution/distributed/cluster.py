"""Start or join Ray, with every worker process limited to the configured threads; rendezvous.

Private by default: a local Ray (one this job starts) runs with its node address on loopback,
so its head, node, worker and agent ports listen on 127.0.0.1 only, and with Ray's token
authentication, so other processes on the machine need its token to submit work. The fit
workers' rendezvous listens on ``cluster.listen`` (loopback by default). ``cluster.node_ip``
and ``cluster.listen`` open them deliberately (docs/security.md).
"""

from __future__ import annotations

import ipaddress
import os
import resource
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from attribution.settings import LOOPBACK, ClusterSettings, SettingsError

if TYPE_CHECKING:
    import torch

AUTH_MODE = "RAY_AUTH_MODE"


def default_token_path() -> Path:
    """Where Ray reads and writes a local cluster's token by default."""
    return Path.home() / ".ray" / "auth_token"

# As long as torch's own tcp:// rendezvous waits for the other workers.
STORE_TIMEOUT = timedelta(minutes=30)


def worker_environment() -> dict[str, str]:
    """What workers inherit from the driver: the thread limit (extra torch threads on shared
    cores slow CPU workers down several times) and the ``ATTRIBUTION_*`` settings."""
    forwarded = {name: value for name, value in os.environ.items() if name.startswith("ATTRIBUTION_")}
    return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **forwarded}


def prepare_worker_process() -> None:
    """In a worker's constructor: the driver's thread limit, and no per-file weight-loading bars
    (each would print as its own line on the driver)."""
    import torch
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    transformers_logging.disable_progress_bar()


@contextmanager
def ray_session(cluster: ClusterSettings, extra_workers: int = 0) -> Iterator[None]:
    """Join ``cluster.address`` (``auto`` or an address), the cluster of a ``ray job submit``
    (``RAY_ADDRESS``), or start a local Ray in this process, with room for ``cluster.num_workers`` and
    ``extra_workers`` more workers; shut down only what was started here."""
    if ray.is_initialized():
        yield
        return
    runtime_env = {"env_vars": worker_environment()}
    with _sigterm_handler_kept():
        if cluster.address is not None:
            ray.init(address=cluster.address, runtime_env=runtime_env)
        elif os.environ.get("RAY_ADDRESS"):
            ray.init(runtime_env=runtime_env)
        else:
            cpus = max(os.cpu_count() or 1, int((cluster.num_workers + extra_workers) * cluster.cpus_per_worker))
            start_local_ray(cluster, num_cpus=cpus, runtime_env=runtime_env)
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _sigterm_handler_kept() -> Iterator[None]:
    """Keep this process's SIGTERM handler across ``ray.init``, which replaces it with its own
    ``sys.exit``: a job's handler stops it cleanly (:mod:`attribution.termination`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, handler)


def start_local_ray(cluster: ClusterSettings, **init_options: object) -> None:
    """``ray.init`` of a new single-machine Ray on ``cluster.node_ip``, token-authenticated, no dashboard.

    ``address="local"``: without it Ray joins any cluster ``ray start`` left running on this machine.
    """
    use_token_authentication()
    node_ip = None if cluster.node_ip == "auto" else cluster.node_ip
    with _node_address_kept(node_ip):
        ray.init(address="local", include_dashboard=False, _node_ip_address=node_ip, **init_options)


def use_token_authentication() -> None:
    """Token authentication for a local Ray, chosen explicitly.

    Ray enables it by default for a new local cluster (generating ``~/.ray/auth_token`` when
    missing) and logs a WARNING that it chose to; choosing it here keeps the protection and
    the log quiet. An explicit ``RAY_AUTH_MODE`` (``token`` or ``disabled``) is kept. The
    driver's Ray config was read when Ray was imported, so it is re-read, as Ray does itself
    when it turns token authentication on.
    """
    if os.environ.get(AUTH_MODE) is None:
        os.environ[AUTH_MODE] = "token"
        from ray._raylet import Config

        Config.initialize("")
    if os.environ[AUTH_MODE].lower() == "token":
        private_token_file()


def private_token_file() -> None:
    """The token file readable by its owner only (0600), created so when it is missing.

    Ray writes ``~/.ray/auth_token`` with the process's umask, usually 0644: anyone on the
    machine could read the token and submit work. A token given by ``RAY_AUTH_TOKEN`` or
    ``RAY_AUTH_TOKEN_PATH`` is the user's own arrangement and is left alone.
    """
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = default_token_path()
    if not path.exists():
        from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:  # another job created it meanwhile
            pass
        else:
            with os.fdopen(handle, "w") as file:
                file.write(generate_new_authentication_token())
    if path.stat().st_mode & 0o077 and path.stat().st_uid == os.getuid():
        path.chmod(0o600)


@contextmanager
def _node_address_kept(node_ip: str | None) -> Iterator[None]:
    """Keep a loopback node address while Ray starts.

    Ray's servers listen on loopback only when the node address is 127.0.0.1, but on Linux
    Ray replaces 127.0.0.1 with the machine's external address unless it runs as the
    single-machine Ray it is on macOS and Windows (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
    read once when Ray is imported). That mode is switched on for the start of this Ray only,
    so joining a real cluster later in this process is unaffected.
    """
    if node_ip != LOOPBACK:
        yield
        return
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def peak_memory_mib() -> float:
    """This process's peak resident memory (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` now (loopback by default)."""
    with socket.socket(_family(host)) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def rendezvous_host(listen: str) -> str:
    """The address a rendezvous listens on: ``cluster.listen``, where ``node`` is this Ray node's address."""
    return ray.util.get_node_ip_address() if listen == "node" else listen


def listening_socket(host: str) -> socket.socket:
    """A TCP socket bound to ``host`` on a free port and listening, for a rendezvous server.

    Bound and listening before its port is handed out, so no other process can take the port
    in between, and bound to ``host`` alone (torch's own store binds every interface).
    """
    return socket.create_server((host, 0), family=_family(host), backlog=128)


def check_rendezvous_reach(listen: str, worker_addresses: list[str]) -> None:
    """Workers on several machines cannot meet on loopback: say which setting opens it.

    A machine is a Ray node address: several nodes on one address (one machine) share its loopback.
    """
    machines = len(set(worker_addresses))
    if machines > 1 and listen != "node" and ipaddress.ip_address(listen).is_loopback:
        raise SettingsError(
            f"cluster.listen={listen}: the fit workers run on {machines} machines, which cannot reach a rendezvous "
            "on loopback; set cluster.listen=node (the Ray node's address)"
        )


def worker_host(rendezvous: str, rank: int) -> str:
    """The address of a fit worker's own connections (gloo).

    Rank 0 listens on the rendezvous address, and so does every worker when it is loopback
    (they are all on that machine: :func:`check_rendezvous_reach`). Otherwise it may be another
    machine's address, so the worker uses its own Ray node's address.
    """
    if rank == 0 or ipaddress.ip_address(rendezvous).is_loopback:
        return rendezvous
    return ray.util.get_node_ip_address()


def interface_of(address: str) -> str | None:
    """The network interface of this machine that holds ``address`` (None when none does)."""
    import psutil

    for name, entries in psutil.net_if_addrs().items():
        if any(entry.address.split("%")[0] == address for entry in entries):
            return name
    return None


def init_process_group(rank: int, world_size: int, host: str, port: int, listener: socket.socket | None,
                       use_gpu: bool, own_host: str | None = None) -> None:
    """Join the workers' torch.distributed group through a TCP store at ``host:port``.

    Rank 0 serves the store on ``listener`` (bound to ``host`` only). Gloo's own connections use
    the interface of ``own_host`` (this worker's address, ``host`` by default): torch builds the
    gloo device itself (a device given in ``pg_options`` is ignored), from GLOO_SOCKET_IFNAME, or
    else from the address the machine's host name resolves to, which need not be ``own_host``.
    NCCL's bootstrap stays on the loopback interface when that is loopback. A variable the user
    set is kept.
    """
    import torch.distributed as dist

    local = own_host or host
    interface = interface_of(local)
    if interface is not None and not use_gpu:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    if interface is not None and use_gpu and ipaddress.ip_address(local).is_loopback:
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    fd = listener.detach() if listener is not None else None
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=STORE_TIMEOUT,
                          wait_for_workers=False, master_listen_fd=fd)
    dist.init_process_group("nccl" if use_gpu else "gloo", store=store, rank=rank, world_size=world_size)


class TorchCollective:
    """The process group of this worker: sums in place across all workers."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_reduce(self, tensors: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        for tensor in tensors:
            if tensor.is_contiguous():
                dist.all_reduce(tensor)
            else:
                # The backends reduce raw memory: a strided tensor (eigh returns column-major
                # eigenvectors) would be summed against another rank's row-major copy.
                reduced = tensor.contiguous()
                dist.all_reduce(reduced)
                tensor.copy_(reduced)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


class GroupMember:
    """The part of a Ray actor that joins the workers' torch.distributed group (fitting, sharded scoring).

    The driver asks every member its node address, has rank 0 open the store (:meth:`rendezvous`),
    then calls each member's own method, which calls :meth:`join_group` first (:func:`start_group`).
    """

    def __init__(self) -> None:
        prepare_worker_process()
        self.listener: socket.socket | None = None

    def node_address(self) -> str:
        return ray.util.get_node_ip_address()

    def rendezvous(self, listen: str) -> tuple[str, int]:
        """Rank 0: open the group's store on ``cluster.listen`` and say where it is."""
        host = rendezvous_host(listen)
        self.listener = listening_socket(host)
        return host, self.listener.getsockname()[1]

    def join_group(self, rank: int, world_size: int, address: str, port: int, device: str) -> None:
        """Join the group at ``address:port`` (nccl when the model runs on this worker's GPU, else gloo)."""
        import torch

        use_gpu = torch.cuda.is_available() and device != "cpu"
        init_process_group(rank, world_size, address, port, self.listener if rank == 0 else None, use_gpu,
                           own_host=worker_host(address, rank))


def start_group(members: list, listen: str) -> tuple[str, int]:
    """Where the members of a new group meet: checked reachable from every member's machine, opened by rank 0."""
    check_rendezvous_reach(listen, ray.get([member.node_address.remote() for member in members]))
    return ray.get(members[0].rendezvous.remote(listen))

