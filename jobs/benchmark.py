"""Throughput benchmark: ``python -m jobs.benchmark`` (see conf/benchmark.yaml)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig

from attribution.benchmark import benchmark_model, format_rows, gpt_neox_from_config
from attribution.models import load_model
from attribution.runs import write_json_atomically
from attribution.settings import resolve_device
from jobs.wiring import limit_threads, model_and_data, plain


@hydra.main(config_path="../conf", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    limit_threads()
    settings = plain(cfg.benchmark)
    device = resolve_device(cfg.model.device)
    models = {}
    if settings["include_model_path"]:
        model_settings, _ = model_and_data(cfg)
        models["demo" if cfg.model.path is None else Path(model_settings.path).name] = load_model(model_settings.path)[0]
    for name, config in settings["configs"].items():
        models[name] = gpt_neox_from_config(**config)
    rows = []
    for name, model in models.items():
        rows += benchmark_model(
            name, model, settings["query_counts"], settings["ranks"], settings["batch_size"], settings["length"],
            settings["num_batches"], settings["warmup"], settings["repeats"], device,
        )
        print(format_rows(rows), flush=True)
    write_json_atomically(Path(cfg.output_dir) / "benchmark.json", [asdict(r) for r in rows])


if __name__ == "__main__":
    main()
