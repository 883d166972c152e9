"""A tiny saved model, a corpus of four shards that arrive over several nights, standing queries."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attribution.settings import (
    DataSettings,
    FactorSettings,
    ModelSettings,
    QuerySettings,
    ScoreSettings,
)
from tests.tiny import save_tiny_lm

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "in", "parks", "near", "rivers", "and", "birds", "sang", "over", "hills"]
QUERIES = [
    {"id": "q-cat", "prompt": "the cat sat on", "completion": " a mat"},
    {"id": "q-dog", "prompt": "dogs ran in", "completion": " parks"},
    {"id": "q-bird", "prompt": "birds sang over", "completion": " hills and rivers"},
]


def shard_rows(shard: int, count: int = 5, prefix: str = "doc") -> list[dict]:
    rng = np.random.default_rng(shard + (100 if prefix != "doc" else 0))
    return [{"id": f"{prefix}-{shard}-{i}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))}
            for i in range(count)]


def write_shard(corpus: Path, index: int, rows: list[dict]) -> Path:
    corpus.mkdir(parents=True, exist_ok=True)
    path = corpus / f"shard-{index}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@dataclass
class World:
    """Everything a sweep test needs; ``corpus`` starts empty, tests add shards night by night."""

    root: Path
    corpus: Path
    output: Path
    model: ModelSettings
    data: DataSettings
    factors: FactorSettings
    queries: QuerySettings
    score: ScoreSettings

    def arrive(self, *shards: int) -> None:
        for index in shards:
            write_shard(self.corpus, index, shard_rows(index))


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep-model")
    texts = [row["text"] for shard in range(6) for row in shard_rows(shard) + shard_rows(shard, prefix="new")]
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    save_tiny_lm(root / "model", texts + WORDS)
    return root


@pytest.fixture
def world(tiny_lm, tmp_path) -> World:
    (tmp_path / "corpus").mkdir()  # data.path must exist when the settings are built
    return World(
        root=tmp_path,
        corpus=tmp_path / "corpus",
        output=tmp_path / "sweep",
        model=ModelSettings(path=str(tiny_lm / "model"), device="cpu"),
        data=DataSettings(path=str(tmp_path / "corpus"), max_length=16, batch_size=4),
        factors=FactorSettings(strategy="identity"),
        queries=QuerySettings(path=str(tiny_lm / "queries.jsonl")),
        score=ScoreSettings(rank=4, top_k=4, bottom_k=2, query_batch_size=2, token_scores=True, progress=False),
    )
