"""Several Ray nodes on this machine: a head (no CPU: it runs the jobs' drivers) and two worker
nodes of one CPU each, all on 127.0.0.1 with token authentication, started by
:mod:`tests.distributed.mini_cluster`. Jobs join it as users do (``python -m jobs.X
cluster.address=...``): fitting all-reduces across the nodes, the scoring pool spans them, and a
node whose raylet is killed mid-score leaves the table of an uninterrupted run.

The tests share one cluster and run in file order: the last one kills a node.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from attribution.curvature.store import load_factors
from attribution.fitting import run_fit
from attribution.models import find_tracked_modules, load_model
from attribution.scoring.run import run_score
from attribution.scoring.shards import FAULT_SWITCH
from attribution.settings import DataSettings, FactorSettings, ModelSettings, QuerySettings, ScoreSettings
from tests.distributed.test_fit import assert_same_factors
from tests.distributed.test_loopback import is_loopback, listeners
from tests.scoring.test_run import WORDS, corpus_rows, write_shards
from tests.tiny import save_tiny_lm

pytestmark = pytest.mark.filterwarnings("ignore")

REPOSITORY = Path(__file__).resolve().parents[2]
WORKER_NODES = 2
JOB_SECONDS = 300


@dataclass
class Cluster:
    address: str
    environment: dict[str, str]  # for the jobs: the cluster's token, loopback, this checkout's code
    process: subprocess.Popen  # the mini_cluster process, leader of its process group
    head: str  # node ids
    raylets: dict[str, int]  # worker node id -> its raylet's PID


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    token = root / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    environment = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
    environment.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every node and driver on 127.0.0.1 (tests only)
        # A node is declared dead after 3 failed health checks 0.5 s apart (Ray's defaults: ~15 s).
        "RAY_health_check_period_ms": "500",
        "RAY_health_check_failure_threshold": "3",
        "OMP_NUM_THREADS": "1",
        # The workers import this checkout, as the drivers do.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")])),
    })
    info = root / "cluster.json"
    with (root / "cluster.log").open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "tests.distributed.mini_cluster", str(info), str(WORKER_NODES)],
                                   env=environment, cwd=REPOSITORY, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not info.exists():
            assert process.poll() is None and time.monotonic() < deadline, (root / "cluster.log").read_text()[-3000:]
            time.sleep(0.2)
        described = json.loads(info.read_text())
        (head,) = [node["node_id"] for node in described["nodes"] if node["head"]]
        raylets = {node["node_id"]: node["raylet_pid"] for node in described["nodes"] if not node["head"]}
        yield Cluster(described["address"], environment, process, head, raylets)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever of the group is left (a worker its killed raylet left behind)
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_job(cluster: Cluster, module: str, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, f"cluster.address={cluster.address}", *overrides]
    return subprocess.run(command, env=cluster.environment, cwd=REPOSITORY, capture_output=True, text=True, timeout=JOB_SECONDS)


def run_record(output: Path) -> dict:
    (record,) = list((output / "runs").glob("*.json"))
    return json.loads(record.read_text())


# Asks the head's GCS for the nodes: fails at once on a wrong token (ray.init retries for ~20 s).
GCS_PROBE = ("import sys; from ray._raylet import GcsClient; "
             "print(len(GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10)))")


def test_the_nodes_listen_on_loopback_and_ask_for_the_token(cluster, tmp_path):
    seen = listeners(psutil.Process(cluster.process.pid))
    assert {"gcs_server", "raylet"} <= {name for name, _, _ in seen}, seen  # the sample did see the nodes
    exposed = sorted(entry for entry in seen if not is_loopback(entry[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"
    probe = [sys.executable, "-c", GCS_PROBE, cluster.address]
    member = subprocess.run(probe, env=cluster.environment, capture_output=True, text=True, timeout=120)
    assert member.returncode == 0 and member.stdout.split()[-1] == str(1 + WORKER_NODES), member.stderr[-2000:]
    wrong = tmp_path / "wrong-token"
    wrong.write_text(secrets.token_hex(32))
    stranger = subprocess.run(probe, env={**cluster.environment, "RAY_AUTH_TOKEN_PATH": str(wrong)}, capture_output=True,
                              text=True, timeout=120)
    assert stranger.returncode != 0 and "InvalidAuthToken" in stranger.stderr, stranger.stderr[-2000:]


@pytest.fixture(scope="module")
def fit_inputs(tmp_path_factory):
    """A model, a corpus and the factors one process fits on them (no Ray)."""
    root = tmp_path_factory.mktemp("fit")
    rows = corpus_rows(11)
    model_dir = save_tiny_lm(root / "model", [r["text"] for r in rows])
    # Uneven shards: 7, 1 and 3 documents, with an empty text among them.
    corpus = write_shards(root / "corpus", [rows[:7], [{"id": "blank", "text": ""}], rows[7:]])
    model = ModelSettings(path=str(model_dir), device="cpu", dtype="float64")
    data = DataSettings(path=corpus, batch_size=3, max_length=16)
    single = run_fit(model, data, FactorSettings(dtype="float64", path=str(root / "one")), root / "a", {}, progress=False)
    return model_dir, corpus, single.factors_path


# 127.0.0.1: the nodes share this machine's loopback; node: each worker's node address, as
# workers on several machines meet (here it is 127.0.0.1 too).
# cluster.listen=node (the rendezvous on the node's own address) is the multi-machine setting: slow, as
# the suite's time is kept under 15 minutes; 127.0.0.1 runs in CI.
@pytest.mark.parametrize("listen", ["127.0.0.1", pytest.param("node", marks=pytest.mark.slow)])
def test_fitting_across_two_nodes_equals_one_process(cluster, fit_inputs, tmp_path, listen):
    model_dir, corpus, single = fit_inputs
    output = tmp_path / "nodes"
    finished = run_job(cluster, "jobs.fit_factors", f"model.path={model_dir}", "model.device=cpu", "model.dtype=float64",
                       f"data.path={corpus}", "data.batch_size=3", "data.max_length=16", "factors.dtype=float64",
                       "cluster.num_workers=2", f"cluster.listen={listen}", f"output_dir={output}", "progress=false")
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    nodes = [worker["node"] for worker in run_record(output)["config"]["workers"]]
    assert sorted(nodes) == sorted(cluster.raylets), f"one fit worker on each worker node: {nodes}"
    lm, _ = load_model(model_dir)
    tracked = find_tracked_modules(lm)
    one = load_factors(single, tracked, None)
    two = load_factors(output / "factors", tracked, None)
    assert two.manifest.data["workers"] == 2
    assert (two.manifest.num_sequences, two.manifest.num_tokens) == (one.manifest.num_sequences, one.manifest.num_tokens)
    assert_same_factors(one, two)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A store and queries, and the table of an uninterrupted run in one process (no Ray)."""
    root = tmp_path_factory.mktemp("score")
    rows = corpus_rows(16)
    model_dir = save_tiny_lm(root / "model", [r["text"] for r in rows] + WORDS)
    corpus = write_shards(root / "corpus", [rows[:5], rows[5:6], rows[6:12], rows[12:]])
    queries = root / "queries.jsonl"
    prompts = [("the cat sat on", " a mat"), ("dogs ran in", " parks"), ("birds sang over", " hills")]
    queries.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "completion": c}) + "\n"
                               for i, (p, c) in enumerate(prompts)))
    model = ModelSettings(path=str(model_dir), device="cpu")
    data = DataSettings(path=corpus, batch_size=2, max_length=16)
    store = run_fit(model, data, FactorSettings(path=str(root / "factors")), root / "fit", {}, progress=False)
    score = ScoreSettings(rank=4, top_k=4, bottom_k=2, query_batch_size=2, progress=False)
    reference = run_score(model, data, FactorSettings(path=str(store.factors_path)), QuerySettings(str(queries)), score,
                          root / "reference", {})
    overrides = [f"model.path={model_dir}", "model.device=cpu", f"data.path={corpus}", "data.batch_size=2", "data.max_length=16",
                 f"queries.path={queries}", f"factors.path={store.factors_path}", "score.rank=4", "score.top_k=4",
                 "score.bottom_k=2", "score.query_batch_size=2", "score.progress=false", "refine.method=none",
                 "cluster.num_workers=2"]
    return overrides, corpus, table(reference.scores_path)


def table(path: Path) -> list[tuple]:
    rows = pq.read_table(path).drop_columns(["run_id"]).to_pylist()
    return sorted((r["query_id"], r["direction"], r["rank"], r["doc_id"], r["shard"], round(r["score"], 4)) for r in rows)


def scores(output: Path) -> list[tuple]:
    (path,) = list((output / "scores").glob("*.parquet"))
    return table(path)


# The killed-node test below scores on a pool across both nodes too; this one checks placement: slow suite.
@pytest.mark.slow
def test_the_scoring_pool_spans_the_nodes(cluster, inputs, tmp_path):
    overrides, _, reference = inputs
    output = tmp_path / "pool"
    finished = run_job(cluster, "jobs.score", *overrides, f"output_dir={output}")
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    assert scores(output) == reference
    record = run_record(output)
    workers = record["config"]["workers"]
    assert sorted(worker["node"] for worker in workers) == sorted(cluster.raylets), workers
    assert all(worker["tasks"] >= 1 for worker in workers), workers
    # Every task once: 2 query batches (3 queries, 2 a batch), then 2 passes over 4 shards.
    assert sum(worker["tasks"] for worker in workers) == 2 + 2 * 4
    assert record["config"]["lost_workers"] == [] and record["config"]["failed_units"] == []


def raylet_of(pid: int, raylets: dict[str, int]) -> str:
    """The node whose raylet started process ``pid``."""
    process = psutil.Process(pid)
    by_pid = {raylet: node for node, raylet in raylets.items()}
    return next(by_pid[parent.pid] for parent in process.parents() if parent.pid in by_pid)


def test_a_node_killed_mid_score_leaves_the_table_of_an_uninterrupted_run(cluster, inputs, tmp_path):
    overrides, corpus, reference = inputs
    output, held = tmp_path / "killed", tmp_path / "held"
    # The worker scoring the last shard's second batch writes its PID to `held` and waits there.
    last_shard = sorted(os.listdir(corpus))[-1]
    environment = {**cluster.environment, FAULT_SWITCH: f"{last_shard}:1:hold:{held}"}
    command = [sys.executable, "-m", "jobs.score", f"cluster.address={cluster.address}", *overrides, f"output_dir={output}"]
    holder = None
    with (tmp_path / "stdout").open("w") as stdout, (tmp_path / "stderr").open("w") as stderr:
        job = subprocess.Popen(command, env=environment, cwd=REPOSITORY, stdout=stdout, stderr=stderr)
        try:
            deadline = time.monotonic() + JOB_SECONDS
            while not held.exists():
                assert job.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
                assert time.monotonic() < deadline, "no worker reached the held batch"
                time.sleep(0.1)
            holder = int(held.read_text())
            killed = raylet_of(holder, cluster.raylets)
            assert list(output.glob(".work/*/units/*.parquet")), "no unit was finished before the node is killed"
            assert job.poll() is None
            os.kill(cluster.raylets[killed], signal.SIGKILL)
            job.wait(timeout=JOB_SECONDS)
        finally:
            if job.poll() is None:
                job.kill()
            if holder is not None and psutil.pid_exists(holder):
                os.kill(holder, signal.SIGKILL)  # the held worker outlives its raylet: a lost machine would take it too
    assert job.returncode == 0, (tmp_path / "stderr").read_text()[-3000:]
    assert scores(output) == reference
    record = run_record(output)
    (survivor,) = set(cluster.raylets) - {killed}
    assert [worker["node"] for worker in record["config"]["lost_workers"]] == [killed], record["config"]["lost_workers"]
    assert [worker["node"] for worker in record["config"]["workers"]] == [survivor], record["config"]["workers"]
    assert record["config"]["failed_units"] == []
    assert record["counts"]["units"] == 8 and record["counts"]["units_resumed"] == 0
