"""Time and memory of the refinement's Gauss-Newton products in one process and split over ``refine.workers``.

On the embedded demo model: a sample of SEQUENCES corpus documents (the demo's 128-token sequences, in
batches of 8, the first CACHED of each process's part kept), COLUMNS random query vectors, PRODUCTS products
(the first builds the kept graphs and is reported apart). For each worker count K in WORKERS (0: this
process, with as many torch threads as the machine's cores) it prints one JSON line: seconds per product
after the first, the first's seconds, the peak resident memory of this process and of each worker, and the
largest difference from the first count's products (the same sum, added in another order). The driver's peak
is the process's highest so far, so list 0 last.

    python benchmarks/refinement_workers.py SEQUENCES CACHED COLUMNS PRODUCTS WORKERS...

e.g. ``python benchmarks/refinement_workers.py 256 256 4 4 2 1 0`` (docs/scale.md, "Refinement on workers").
"""

from __future__ import annotations

import json
import os
import sys
import time

import ray
import torch

from attribution.curvature.gauss_newton import GaussNewton, eager_attention
from attribution.demo.train import ensure_demo
from attribution.distributed.cluster import peak_memory_mib, ray_session
from attribution.models import find_tracked_modules, load_model, model_fingerprint
from attribution.refine.product_pool import ProductSource, RemoteGaussNewton, start_product_workers, stop_product_workers
from attribution.refine.sample import sample_batches
from attribution.settings import ClusterSettings, ModelSettings

LENGTH, BATCH = 128, 8


def main(sequences: int, cached: int, columns: int, products: int, worker_counts: list[int]) -> None:
    demo = ensure_demo()
    settings = ModelSettings(path=str(demo.model_dir), device="cpu")
    model, tokenizer = load_model(settings.path, False, torch.float32, "cpu")
    tracked = find_tracked_modules(model)
    sample = sample_batches(tokenizer, str(demo.corpus_dir), LENGTH, BATCH, sequences, lambda skip: None, "sample")
    count = sum(len(batch.ids) for batch in sample)
    source = ProductSource(settings.path, settings, model_fingerprint(model), tuple(m.name for m in tracked),
                           str(demo.corpus_dir), LENGTH, BATCH, sequences, cached, "sample")
    size = sum(m.d_out * m.d_in_augmented for m in tracked)
    vectors = torch.randn(columns, size, generator=torch.Generator().manual_seed(0))
    reference = None

    def operator(pool: dict[str, list]) -> GaussNewton | RemoteGaussNewton:
        """The products on the pool's workers, or in this process with every core's threads."""
        if pool:
            return RemoteGaussNewton(pool["model"], source, len(sample), count, size, torch.device("cpu"))
        torch.set_num_threads(os.cpu_count() or 1)
        return GaussNewton(model, tracked, sample, cached_sequences=cached)

    with ray_session(ClusterSettings(num_workers=max(worker_counts))):
        for workers in worker_counts:
            pool = start_product_workers(ClusterSettings(num_workers=0), workers, ["model"]) if workers else {}
            times = []
            with eager_attention(model):
                started = time.perf_counter()
                products_of = operator(pool)
                for _ in range(products):
                    result = products_of(vectors)
                    times.append(time.perf_counter() - started)
                    started = time.perf_counter()
            reference = result if reference is None else reference
            peaks = ray.get([worker.peak_memory_mib.remote() for worker in pool["model"]]) if workers else []
            print(json.dumps({
                "workers": workers, "sequences": count, "cached": cached, "columns": columns,
                "seconds_per_product": round(sum(times[1:]) / max(1, len(times) - 1), 2),
                "first_product_seconds": round(times[0], 2), "driver_peak_mib": round(peak_memory_mib()),
                "worker_peak_mib": [round(peak) for peak in peaks],
                "largest_relative_difference": float(((result - reference).norm(dim=1) / reference.norm(dim=1)).max()),
            }), flush=True)
            del products_of
            stop_product_workers(pool)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:5]), [int(k) for k in sys.argv[5:]])
