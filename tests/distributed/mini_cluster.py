"""A Ray cluster of a head and worker nodes on this machine, all on 127.0.0.1, run as its own process.

``python -m tests.distributed.mini_cluster INFO_FILE WORKER_NODES`` starts the nodes with
``ray.cluster_utils.Cluster`` (which, unlike ``ray start --address``, starts worker nodes while
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps every node's address on loopback), writes the
cluster's address and each node's id and raylet PID to INFO_FILE as JSON, and stops every node
on SIGTERM. Token authentication comes from the environment (``RAY_AUTH_MODE=token``,
``RAY_AUTH_TOKEN_PATH``), which every node's processes inherit. Nothing of it is left in Ray's
machine-wide places (/tmp/ray): other Ray users on the machine never see it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading

from ray._private import ray_constants
from ray._private import utils as ray_utils
from ray.cluster_utils import Cluster


def main(info_file: str, worker_nodes: int) -> None:
    temp_dir = tempfile.mkdtemp(prefix="raymn")  # short: Ray's socket paths must stay under 108 bytes
    # Cluster would record its address in /tmp/ray/ray_current_cluster, where every ray.init()
    # on the machine without an address (every job's local Ray) would then try to join it.
    ray_utils.write_ray_address = lambda *_, **__: None
    common = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024 * 1024}
    # The head runs the drivers only (no CPU): every worker lands on a worker node.
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                      head_node_args={**common, "num_cpus": 0, "include_dashboard": False, "temp_dir": temp_dir})
    nodes = [cluster.head_node] + [cluster.add_node(**common, num_cpus=1) for _ in range(worker_nodes)]
    cluster.wait_for_nodes()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # after the nodes, which set their own
    info = {"address": cluster.address,
            "nodes": [{"node_id": node.node_id, "head": node is cluster.head_node,
                       "raylet_pid": node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid} for node in nodes]}
    partial = info_file + ".partial"
    with open(partial, "w") as file:
        json.dump(info, file)
    os.replace(partial, info_file)
    stop.wait()
    try:
        cluster.shutdown()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
