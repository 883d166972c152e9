"""The GPU check: a ~160M-parameter GPT-NeoX built from a config, in float32 and bfloat16.

    python benchmarks/gpu.py [--dry-run] [--output DIR]

1. Throughput over plain forward+backward of the same batches (8 x 512 random tokens): the two
   fitting passes and scoring at Q = 1 and 64, rank 32, with each step's peak GPU memory.
2. End to end: the model saved with the demo tokenizer, ``run_fit`` on 256 demo documents and
   ``run_score`` of 64 queries against the demo corpus, wall time and peak GPU memory.

``--dry-run`` runs the same code on a tiny config on whatever device there is (CPU included)
in about a minute, to check the script before spending device time. Writes ``gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from attribution.benchmark import PeakMemory, benchmark_model, format_rows, gpt_neox_from_config
from attribution.demo.train import ensure_demo
from attribution.fitting import run_fit
from attribution.scoring.run import run_score
from attribution.settings import ClusterSettings, DataSettings, FactorSettings, ModelSettings, QuerySettings, ScoreSettings

GPT_NEOX_160M = {"vocab_size": 50304, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "intermediate_size": 3072, "max_position_embeddings": 2048}
TINY = {"vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 256}


def end_to_end(config: dict, dtype: str, device: str, root: Path, documents: int, queries: int, length: int) -> dict:
    """Fit and score the model (saved with the demo tokenizer) on the demo corpus; seconds and peak memory."""
    demo = ensure_demo()
    model_dir = root / f"model-{dtype}"
    if not model_dir.is_dir():
        from transformers import AutoTokenizer

        gpt_neox_from_config(**config).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(demo.model_dir).save_pretrained(model_dir)
    model = ModelSettings(path=str(model_dir), dtype=dtype, device=device)
    data = DataSettings(path=str(demo.corpus_dir), max_length=length, batch_size=8)
    factors = FactorSettings(path=str(root / f"factors-{dtype}"), max_sequences=documents)
    result = {"dtype": dtype}
    with PeakMemory(torch.device(device)) as peak:
        started = time.perf_counter()
        run_fit(model, data, factors, root / f"fit-{dtype}", {}, progress=False)
        result["fit_seconds"] = round(time.perf_counter() - started, 1)
    result["fit_peak_mib"] = peak.mib
    query_file = root / "queries.jsonl"
    rows = [json.loads(line) for line in demo.queries_path.read_text().splitlines()]
    query_file.write_text("".join(json.dumps({**rows[i % len(rows)], "id": f"q{i}"}) + "\n" for i in range(queries)))
    score = ScoreSettings(rank=32, top_k=10, query_batch_size=queries, token_scores=False, progress=False, dtype=dtype,
                          dense_factors_mib=24576)
    with PeakMemory(torch.device(device)) as peak:
        started = time.perf_counter()
        summary = run_score(model, data, factors, QuerySettings(str(query_file)), score, root / f"score-{dtype}", {},
                            cluster=ClusterSettings(num_workers=0))
        result["score_seconds"] = round(time.perf_counter() - started, 1)
    result["score_peak_mib"] = peak.mib
    result["stages"] = json.loads(summary.run_record.read_text())["config"]["task_seconds"]
    result["documents_per_second"] = round(summary.counts["document_passes"] / result["stages"]["units"], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on any device, to check the script")
    parser.add_argument("--output", default="outputs/gpu")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config, length, counts, e2e = (TINY, 64, [1, 8], (32, 8)) if args.dry_run else (GPT_NEOX_160M, 512, [1, 64], (256, 64))
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    rows, runs = [], []
    for dtype in (torch.float32, torch.bfloat16):
        rows += benchmark_model("gpt_neox_160m" if not args.dry_run else "tiny", gpt_neox_from_config(**config), counts,
                                [32], 8, length, 3, 1, 3, torch.device(device), dtype, dense_factors_mib=24576,
                                query_chunk=16)
        print(format_rows(rows), flush=True)
    for dtype in ("float32", "bfloat16"):
        runs.append(end_to_end(config, dtype, device, root, *e2e, length=min(length, 128)))
        print(json.dumps(runs[-1]), flush=True)
    (root / "gpu.json").write_text(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else device,
                                               "throughput": [asdict(r) for r in rows], "end_to_end": runs}, indent=2))


if __name__ == "__main__":
    main()
