"""Every manifest in deploy/ parses and carries its kind's fields; every job command in deploy/
and docker/ names a job that exists and overrides that compose with its Hydra config."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from attribution.settings import (
    ClusterSettings,
    DataSettings,
    FactorSettings,
    FinetuneSettings,
    MissingPathError,
    ModelSettings,
    PrefilterSettings,
    QuerySettings,
    ScoreSettings,
    from_mapping,
)
from attribution.sweep import SweepSettings

ROOT = Path(__file__).resolve().parents[2]
SCANNED = [ROOT / "deploy", ROOT / "docker"]
SETTINGS = {"model": ModelSettings, "data": DataSettings, "factors": FactorSettings, "queries": QuerySettings,
            "score": ScoreSettings, "prefilter": PrefilterSettings, "cluster": ClusterSettings,
            "finetune": FinetuneSettings, "sweep": SweepSettings}
# ``python -m jobs.NAME``, or a console script ``attribution-NAME`` followed by an override (a bare
# ``attribution-...`` is a Kubernetes resource name such as attribution-data).
JOB = re.compile(r"(?:\bpython3?\s+-m\s+jobs\.(\w+)|(?<![\w/.-])attribution-(\w+)(?=\s+[\w.+~]+=))")


@dataclass(frozen=True)
class Command:
    where: str
    job: str
    overrides: tuple[str, ...]


def files() -> list[Path]:
    return sorted(p for d in SCANNED for p in d.rglob("*") if p.is_file())


def yaml_files() -> list[Path]:
    return [p for p in files() if p.suffix in (".yaml", ".yml")]


def documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def strings(node: Any) -> Iterator[str]:
    """Every string in a parsed YAML tree; a ConfigMap's embedded manifests are parsed too."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        yield " ".join(item for item in node if isinstance(item, str))  # an argv list is one command
        for item in node:
            yield from strings(item)


def logical_lines(text: str) -> Iterator[str]:
    """Lines with backslash continuations joined, comment markers stripped."""
    for line in re.sub(r"\\\n\s*#?", " ", text).splitlines():
        yield line.lstrip().lstrip("#")


def commands_in(text: str, where: str) -> Iterator[Command]:
    """Each ``python -m jobs.NAME key=value ...`` (or ``attribution-NAME ...``) in ``text``."""
    for match in JOB.finditer(text):
        lexer = shlex.shlex(text[match.end():], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        overrides = []
        try:
            for token in lexer:
                if token and token[0] in "();<>|&":
                    break  # the end of this shell command
                overrides.append(token)
        except ValueError:
            pass  # an unbalanced quote after the command ends, e.g. echo '... job ... >> log'
        yield Command(where, match.group(1) or match.group(2), tuple(overrides))


def all_commands() -> list[Command]:
    found = set()
    for path in files():
        name = str(path.relative_to(ROOT))
        if path.suffix in (".yaml", ".yml"):
            for doc in documents(path):
                for text in strings(doc):
                    found.update(commands_in(text, name))
            comments = "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))
            for line in logical_lines(comments):
                found.update(commands_in(line, f"{name} (comment)"))
        elif path.suffix != ".dockerignore":
            for line in logical_lines(path.read_text()):
                exec_form = re.match(r"^(?:CMD|ENTRYPOINT|RUN)\s+(\[.*\])\s*$", line)
                if exec_form:  # a Dockerfile's JSON argv: one command
                    line = " ".join(shlex.quote(arg) for arg in json.loads(exec_form.group(1)))
                found.update(commands_in(line, name))
    return sorted(found, key=lambda c: (c.where, c.job, c.overrides))


def console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def check_command(command: Command) -> None:
    """The job exists; its config composes with the overrides (a wrong key fails); typed settings accept them.

    Paths are on the cluster's volume, not here: a missing one is the only error allowed, and
    it is raised only after every other value of its group was checked.
    """
    job = command.job
    module = ROOT / "jobs" / f"{job}.py"
    assert module.is_file(), f"{command.where}: no job jobs/{job}.py"
    config_name = re.search(r'(?:config_name=|@job\()"(\w+)"', module.read_text())
    assert config_name, f"jobs/{job}.py names no config (@job(...) or @hydra.main(config_name=...))"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=config_name.group(1), overrides=list(command.overrides))
    for group, kind in SETTINGS.items():
        if group in cfg:
            try:
                from_mapping(kind, OmegaConf.to_container(cfg[group], resolve=True), group)
            except MissingPathError:
                pass


COMMANDS = all_commands()


def test_commands_are_found_for_every_cluster_job():
    assert {c.job for c in COMMANDS} >= {"fit_factors", "build_index", "score", "sweep"}
    assert ("docker/Dockerfile", "pipeline", ("output_dir=/tmp/attribution-demo",)) in {
        (c.where, c.job, c.overrides) for c in COMMANDS}  # the image's CMD
    rayjob_entrypoints = [doc["spec"]["entrypoint"] for path in yaml_files() for doc in documents(path)
                          if doc.get("kind") == "RayJob"]
    assert len(rayjob_entrypoints) == 4 and all(JOB.search(e) for e in rayjob_entrypoints)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.where}:{c.job}")
def test_every_command_composes_with_its_job_config(command):
    if command.job not in {p.stem for p in (ROOT / "jobs").glob("*.py")}:
        scripts = console_scripts()
        assert f"attribution-{command.job}" in scripts, f"{command.where}: no job or console script for {command.job}"
    check_command(command)


def test_a_wrong_override_key_or_job_fails_the_check():
    with pytest.raises(HydraException):
        check_command(Command("test", "sweep", ("model.pth=/data/models/my-lm",)))
    with pytest.raises(HydraException):
        check_command(Command("test", "score", ("sweep.date=2025-01-01",)))  # score has no sweep group
    with pytest.raises(ValueError, match="prefilter.kind"):
        check_command(Command("test", "sweep", ("prefilter.kind=bm52",)))
    with pytest.raises(AssertionError, match="no job"):
        check_command(Command("test", "sweeps", ()))
    found = list(commands_in("echo '0 2 * * * python -m jobs.sweep a.b=1 c=2 >> log 2>&1') | crontab -", "t"))
    assert found == [Command("t", "sweep", ("a.b=1", "c=2"))]
    assert [c.job for c in commands_in("attribution-score x=1; name: attribution-sweep-rayjob attribution-data", "t")] == [
        "score"]


# The fields each kind must carry, as dotted paths ("[]" = every item of a list).
REQUIRED = {
    "RayJob": ["apiVersion", "metadata", "spec.entrypoint", "spec.rayClusterSpec.headGroupSpec.rayStartParams",
               "spec.rayClusterSpec.headGroupSpec.template.spec.containers",
               "spec.rayClusterSpec.workerGroupSpecs[].groupName",
               "spec.rayClusterSpec.workerGroupSpecs[].replicas",
               "spec.rayClusterSpec.workerGroupSpecs[].rayStartParams",
               "spec.rayClusterSpec.workerGroupSpecs[].template.spec.containers"],
    "CronJob": ["metadata.name", "spec.schedule", "spec.jobTemplate.spec.template.spec.containers",
                "spec.jobTemplate.spec.template.spec.restartPolicy"],
    "PersistentVolumeClaim": ["metadata.name", "spec.accessModes", "spec.resources.requests.storage"],
    "ServiceAccount": ["metadata.name"],
    "Role": ["metadata.name", "rules"],
    "RoleBinding": ["metadata.name", "subjects", "roleRef.kind", "roleRef.name"],
    "Kustomization": ["apiVersion", "resources"],
}
API_VERSIONS = {"RayJob": "ray.io/v1", "CronJob": "batch/v1", "PersistentVolumeClaim": "v1", "ServiceAccount": "v1",
                "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1",
                "Kustomization": "kustomize.config.k8s.io/v1beta1"}
LAUNCHER = ["cluster_name", "max_workers", "provider.type", "available_node_types", "head_node_type",
            "head_start_ray_commands", "worker_start_ray_commands"]


def values_at(node: Any, path: str) -> list[Any]:
    """The values at a dotted path; a missing (or null) field is an empty list, an empty ``{}`` is present."""
    nodes = [node]
    for part in path.split("."):
        each = part.endswith("[]")
        key = part.removesuffix("[]")
        nodes = [n[key] for n in nodes if isinstance(n, dict) and n.get(key) is not None] if key else nodes
        if each:
            nodes = [item for n in nodes if isinstance(n, list) for item in n]
    return nodes


def missing_fields(doc: dict, paths: list[str]) -> list[str]:
    return [path for path in paths if not values_at(doc, path)]


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_manifests_parse_and_carry_their_kinds_fields(path):
    docs = documents(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        if "kind" not in doc:
            assert "cluster_name" in doc, f"{path}: neither a Kubernetes manifest (kind) nor a cluster-launcher config"
            assert not missing_fields(doc, LAUNCHER)
            assert doc["head_node_type"] in doc["available_node_types"]
            assert doc["provider"]["type"] in {"aws", "gcp", "azure", "kubernetes", "local"}
            continue
        kind = doc["kind"]
        assert kind in REQUIRED, f"{path}: no field check for kind {kind}; add one to this test"
        assert doc["apiVersion"] == API_VERSIONS[kind]
        assert not missing_fields(doc, REQUIRED[kind]), f"{path}: {kind} lacks {missing_fields(doc, REQUIRED[kind])}"
        if kind == "RayJob":
            assert doc["metadata"].get("name") or doc["metadata"].get("generateName")
            containers = values_at(doc, "spec.rayClusterSpec.headGroupSpec.template.spec.containers[]") + values_at(
                doc, "spec.rayClusterSpec.workerGroupSpecs[].template.spec.containers[]")
            assert containers and all(c.get("name") and c.get("image") for c in containers)
            contexts = values_at(doc, "spec.rayClusterSpec.headGroupSpec.template.spec.securityContext") + values_at(
                doc, "spec.rayClusterSpec.workerGroupSpecs[].template.spec.securityContext")
            assert len(contexts) == 1 + len(doc["spec"]["rayClusterSpec"]["workerGroupSpecs"])
            assert all(c.get("runAsUser") not in (None, 0) for c in contexts)  # the image's non-root user
        if kind == "Kustomization":
            for name in doc["resources"] + [f for g in doc.get("configMapGenerator", []) for f in g["files"]]:
                assert (path.parent / name).is_file(), f"{path}: {name} does not exist"


def test_the_cronjob_creates_the_sweep_rayjob_it_is_given():
    kustomization = yaml.safe_load((ROOT / "deploy/kuberay/kustomization.yaml").read_text())
    generated = {g["name"]: g["files"] for g in kustomization["configMapGenerator"]}
    cronjob = next(d for d in documents(ROOT / "deploy/kuberay/sweep-cronjob.yaml") if d["kind"] == "CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    files_in_map = generated[volume["configMap"]["name"]]
    command = pod["containers"][0]["command"]
    assert command[:2] == ["kubectl", "create"] and command[-1] == f"{mount['mountPath']}/{files_in_map[0]}"
    rayjob = documents(ROOT / "deploy/kuberay" / files_in_map[0])[0]
    assert rayjob["kind"] == "RayJob" and "generateName" in rayjob["metadata"]  # a new RayJob each night
    assert JOB.search(rayjob["spec"]["entrypoint"]).group(1) == "sweep"
    role = next(d for d in documents(ROOT / "deploy/kuberay/sweep-cronjob.yaml") if d["kind"] == "Role")
    assert {"ray.io"} == set(role["rules"][0]["apiGroups"]) and "create" in role["rules"][0]["verbs"]
    assert pod["serviceAccountName"] in {d["metadata"]["name"] for d in documents(ROOT / "deploy/kuberay/sweep-cronjob.yaml")
                                         if d["kind"] == "ServiceAccount"}


def test_the_dockerfile_installs_pinned_and_runs_as_a_non_root_user():
    text = (ROOT / "docker/Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.MULTILINE) and "cuda" in text
    assert all("-c constraints.txt" in line for line in text.splitlines() if "pip install" in line)
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    for copied in re.findall(r"^COPY (\S+) ", text, re.MULTILINE):
        assert (ROOT / copied).exists(), f"docker/Dockerfile copies {copied}, which does not exist"


def rayjobs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in yaml_files() for doc in documents(path) if doc.get("kind") == "RayJob"]


def test_every_ray_cluster_requires_ray_token_authentication():
    for path, doc in rayjobs():
        assert doc["spec"]["rayClusterSpec"].get("authOptions") == {"mode": "token"}, path
        major, minor, _ = (int(part) for part in doc["spec"]["rayClusterSpec"]["rayVersion"].split("."))
        assert (major, minor) >= (2, 52), f"{path}: token authentication needs Ray 2.52 or newer"
    launcher = documents(ROOT / "deploy/launcher/cluster.yaml")[0]
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    head = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head  # reached through `ray dashboard`'s tunnel
    comments = (ROOT / "deploy/launcher/cluster.yaml").read_text()
    assert all(line.lstrip("# ").startswith("RAY_AUTH_MODE=token ray job submit")
               for line in comments.splitlines() if "ray job submit" in line)


def test_multi_machine_fits_open_their_rendezvous_to_the_cluster_network():
    """Fit workers in several pods or machines meet at rank 0's node address (cluster.listen=node)."""
    fits = [c for c in COMMANDS if c.job == "fit_factors" and "cluster.address=auto" in c.overrides]
    assert fits
    for command in fits:
        assert "cluster.listen=node" in command.overrides, command
