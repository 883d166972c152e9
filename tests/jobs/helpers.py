"""Running a job as a user does: ``python -m jobs.NAME key=value ...`` in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
JOBS = ("fit_factors", "score", "pipeline", "build_index", "report", "sweep", "evaluate", "benchmark",
        "worker_scaling", "multi_stage_study", "validate_counterfactual", "query_benchmark", "sketch_benchmark", "scale")


def run_job(name: str, *overrides: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, float]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    environment.pop("HYDRA_FULL_ERROR", None) if "HYDRA_FULL_ERROR" not in (env or {}) else None
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", f"jobs.{name}", *overrides], cwd=cwd, env=environment,
                            capture_output=True, text=True, timeout=600)
    return result, time.perf_counter() - started


def tiny_inputs(root: Path, save_model: Callable[..., Path] | None = None) -> dict[str, str]:
    """A saved tiny model (``save_model(directory, texts)``, by default a GPT-NeoX), a two-shard corpus
    and two queries: overrides that keep the demo out."""
    from tests.tiny import save_tiny_lm

    words = "the cat sat on a mat while dogs ran in parks near rivers".split()
    rows = [{"id": f"doc-{i}", "text": " ".join(words[i % 5:i % 5 + 6])} for i in range(10)]
    model = (save_model or save_tiny_lm)(root / "model", [r["text"] for r in rows] + words)
    (root / "corpus").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:5]), root / "corpus" / "shard-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[5:]), root / "corpus" / "shard-1.parquet")
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q-{i}", "prompt": "the cat sat", "completion": f" on {w}"}) + "\n"
                               for i, w in enumerate(("a", "mat"))))
    return {"model.path": str(model), "data.path": str(root / "corpus"), "queries.path": str(queries),
            "model.device": "cpu", "data.max_length": "16", "cluster.num_workers": "0"}


def overrides(values: dict[str, str], *extra: str, job: str = "score") -> list[str]:
    """``key=value`` for the keys that ``job``'s config has, then ``extra``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(job)
    kept = [f"{key}={value}" for key, value in values.items() if OmegaConf.select(cfg, key, default="<absent>") != "<absent>"]
    return kept + list(extra)
