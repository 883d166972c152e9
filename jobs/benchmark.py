"""Benchmarks: ``python -m jobs.benchmark`` (see conf/benchmark.yaml for the sections and their sizes)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig

from jobs.entry import job, say


@job("benchmark")
def main(cfg: DictConfig) -> None:
    from attribution.benchmark import benchmark_model, format_rows, gpt_neox_from_config
    from attribution.benchmark_runs import (
        benchmark_inputs,
        default_cost,
        end_to_end,
        fit_job,
        format_suite,
        memory,
        top_k_cost,
        workers,
    )
    from attribution.models import load_model
    from attribution.runs import write_json_atomically
    from attribution.settings import resolve_device, torch_dtype
    from jobs.wiring import demo_paths, model_and_data, plain, prepare_process

    prepare_process()
    settings = plain(cfg.benchmark)
    output_dir = Path(cfg.output_dir).absolute()
    sections = settings["sections"]
    results: dict[str, list] = {}
    if "throughput" in sections:
        throughput = settings["throughput"]
        device = resolve_device(cfg.model.device)
        configs = dict(throughput["configs"])
        rows = []
        for dtype in throughput["dtypes"]:
            models = {}
            if throughput["include_model_path"]:
                model_settings, _ = model_and_data(cfg)
                models["demo" if cfg.model.path is None else Path(model_settings.path).name] = load_model(model_settings.path)[0]
            for name, config in configs.items():
                models[name] = gpt_neox_from_config(**config)
            for name, model in models.items():
                rows += benchmark_model(
                    name, model, throughput["query_counts"], throughput["ranks"], throughput["batch_size"],
                    throughput["length"], throughput["num_batches"], throughput["warmup"], throughput["repeats"], device,
                    torch_dtype(dtype), throughput["dense_factors_mib"], throughput["fitting"],
                )
                say(format_rows(rows))
                del model
        results["throughput"] = [asdict(r) for r in rows]
    jobs = [section for section in sections if section != "throughput"]
    if jobs:
        demo = demo_paths(cfg)
        model, corpus, queries = demo.model_dir, demo.corpus_dir, demo.queries_path
        suite = []
        e2e = settings["end_to_end"]
        inputs = benchmark_inputs(output_dir / "inputs", model, corpus, queries, e2e["documents"], e2e["queries"], e2e["shards"])
        store = output_dir / "factors"
        if not (store / "manifest.json").is_file():
            fit_job("fit", inputs, store, output_dir / "fit", f"factors.max_sequences={e2e['fit_sequences']}")
        if "end_to_end" in sections:
            suite += end_to_end(output_dir / "end_to_end", inputs, e2e["rank"], e2e["query_batch_size"], e2e["top_k"],
                                e2e["fit_sequences"], e2e["max_length"], e2e["batch_size"])
            say(format_suite(suite))
        if "top_k_cost" in sections:
            cost = settings["top_k_cost"]
            cost_inputs = benchmark_inputs(output_dir / "inputs", model, corpus, queries, e2e["documents"], cost["queries"],
                                           e2e["shards"])
            suite += top_k_cost(output_dir / "top_k_cost", cost_inputs, store, cost["top_k"], cost["query_batch_size"])
            say(format_suite(suite))
        if "memory" in sections:
            mem = settings["memory"]
            suite += memory(output_dir / "memory", model, corpus, queries, store, mem["documents"], mem["queries"],
                            mem["factor"], mem["shards"])
            say(format_suite(suite))
        if "workers" in sections:
            scale = settings["workers"]
            scale_inputs = benchmark_inputs(output_dir / "inputs", model, corpus, queries, scale["documents"],
                                            scale["queries"], scale["shards"])
            suite += workers(output_dir / "workers", scale_inputs, store, scale["counts"])
            say(format_suite(suite))
        if "default_cost" in sections:
            cost = settings["default_cost"]
            cost_sizes = [benchmark_inputs(output_dir / "inputs", model, corpus, queries, documents, cost["queries"],
                                           cost["shards"]) for documents in cost["documents"]]
            suite += default_cost(output_dir / "default_cost", cost_sizes, store, e2e["batch_size"], e2e["max_length"],
                                  cost["project_to"])
            say(format_suite(suite))
        results["jobs"] = [asdict(r) for r in suite]
    write_json_atomically(output_dir / "benchmark.json", results)


if __name__ == "__main__":
    main()
