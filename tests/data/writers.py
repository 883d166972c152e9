"""The same rows written in every corpus form the reader accepts (for tests and the read benchmark)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import ipc

try:
    from compression import zstd  # Python 3.14+
except ImportError:
    from backports import zstd

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "": lambda data: data,
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
    ".zst": zstd.compress,
}


def json_lines(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def json_array(rows: list[dict]) -> bytes:
    return json.dumps(rows, indent=2, ensure_ascii=False).encode()


def write_json(path: Path, rows: list[dict], array: bool = False) -> Path:
    """JSON Lines (or one array) compressed by the path's last suffix, if it names a codec."""
    data = json_array(rows) if array else json_lines(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(COMPRESSORS.get(path.suffix, COMPRESSORS[""])(data))
    return path


def write_parquet(path: Path, rows: list[dict], **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, **kwargs)
    return path


def write_arrow(path: Path, rows: list[dict], file_format: bool = False) -> Path:
    """An Arrow IPC stream (as ``datasets`` writes) or an IPC file (Feather v2)."""
    table = pa.Table.from_pylist(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink:
        opener = ipc.new_file if file_format else ipc.new_stream
        with opener(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(1, len(rows) // 3))
    return path


def write_saved_dataset(folder: Path, rows: list[dict], num_shards: int = 2) -> Path:
    """``datasets.Dataset.save_to_disk``: Arrow shards, state.json and dataset_info.json."""
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_list(rows).save_to_disk(str(folder), num_shards=num_shards)
    return folder


# name -> writer(directory, rows) -> corpus path: one entry per form a corpus can take.
FORMATS: dict[str, Callable[[Path, list[dict]], Path]] = {
    "jsonl": lambda d, rows: write_json(d / "c.jsonl", rows),
    "ndjson": lambda d, rows: write_json(d / "c.ndjson", rows),
    "json_lines_in_json": lambda d, rows: write_json(d / "c.json", rows),
    "json_array": lambda d, rows: write_json(d / "c.json", rows, array=True),
    **{f"jsonl{suffix}": partial(lambda d, rows, s: write_json(d / f"c.jsonl{s}", rows), s=suffix)
       for suffix in (".gz", ".bz2", ".xz", ".zst")},
    "json_array.gz": lambda d, rows: write_json(d / "c.json.gz", rows, array=True),
    "parquet": lambda d, rows: write_parquet(d / "c.parquet", rows, row_group_size=max(1, len(rows) // 3)),
    "arrow_stream": lambda d, rows: write_arrow(d / "c.arrow", rows),
    "arrow_file": lambda d, rows: write_arrow(d / "c.arrow", rows, file_format=True),
    "save_to_disk": lambda d, rows: write_saved_dataset(d / "saved", rows),
}
