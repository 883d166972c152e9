"""Small corpora written as shards, shared by the prefilter tests."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from attribution.data.corpus import list_shards
from attribution.prefilter.index import update_index
from attribution.settings import DataSettings, PrefilterSettings

TEXTS = [
    "The cat sat on the mat while the cat purred",
    "Dogs ran in the park near the river",
    "A river flows past the old mill and the park",
    "Birds sang over the hills at dawn",
    "The mill by the river grinds wheat; wheat and more wheat",
    "Cats and dogs rarely share a mat",
    "Dawn over the hills: birds, wind and rain",
    "An old cat, an old dog, an old mill",
    "   ",
    "Rain fell on the park and the river rose",
    "Wheat fields stretch over the hills",
    "The dog chased the cat up the hills",
]


def write_corpus(directory: Path, texts: list[str] = TEXTS, shards: int = 3) -> list[Path]:
    """``texts`` as ``doc-NN`` rows, split into ``shards`` Parquet files of near-equal size."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"doc-{i:02d}", "text": text} for i, text in enumerate(texts)]
    size = -(-len(rows) // shards)
    for index in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[index * size : (index + 1) * size]), directory / f"shard-{index}.parquet")
    return list_shards(directory)


def build(directory: Path, shards: list[Path], **settings) -> PrefilterSettings:
    prefilter = PrefilterSettings(**settings)
    update_index(directory, prefilter, DataSettings(), shards, on_skip=lambda skip: None)
    return prefilter
