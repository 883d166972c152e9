"""FSDP2 against DeepSpeed ZeRO-3 as the parameter-sharding engine of the curvature capture, on CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sharding_engines.py [--engines none fsdp deepspeed] [--steps 5]

A GPT-NeoX built from a config (random weights; default hidden 1024, 8 layers, vocabulary 50,304:
203M parameters, float32) runs ``--steps`` timed steps of what a fit worker does per batch:
:class:`GradientCapture` over every tracked linear module (a callback that only touches ``a`` and
``ds``) around :func:`backward_log_prob` with true-Fisher draws, on a batch of 2 x 256 tokens per
rank, after one untimed warm-up step. ``none`` is one process holding the whole model (the floor);
``fsdp`` (:func:`attribution.distributed.sharding.shard_model`) and ``deepspeed``
(:func:`attribution.distributed.zero3.shard_with_zero3`) run ``--world-size`` processes, gloo on
loopback, one thread each. Per rank: seconds per step (mean), the parameter elements it holds, its
resident memory after sharding, and its peak resident memory over the steps (the peak is reset
once the model is sharded, so building the whole model first is not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attribution.curvature.capture import GradientCapture
from attribution.log_prob import backward_log_prob
from attribution.models import TrackedModule, find_tracked_modules
from tests.tiny import make_batch

ENGINES = ("none", "fsdp", "deepspeed")


def _build_model(arguments: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=arguments.vocab, hidden_size=arguments.hidden, num_hidden_layers=arguments.layers,
                           num_attention_heads=arguments.hidden // 64, intermediate_size=4 * arguments.hidden,
                           max_position_embeddings=arguments.tokens, hidden_dropout=0.0, attention_dropout=0.0)
    return AutoModelForCausalLM.from_config(config).float().eval()


def _memory_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _run(rank: int, world_size: int, port: int, engine: str, arguments: argparse.Namespace, results: str) -> None:
    """One rank: build, shard, one warm-up and ``steps`` timed steps; its figures to ``results/rank.json``."""
    import gc

    import torch.distributed as dist

    torch.set_num_threads(1)
    if engine != "none":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world_size))
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    model = _build_model(arguments)
    tracked = find_tracked_modules(model)
    total = sum(parameter.numel() for parameter in model.parameters())
    if engine != "none":
        from attribution.distributed.sharding import parameters_held, shard_model

        shard_model(model, engine)
    held = parameters_held(model) if engine != "none" else total
    gc.collect()
    resident = _memory_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size

    touched = [0.0]

    def touch(module: TrackedModule, activations: torch.Tensor, gradients: torch.Tensor) -> None:
        touched[0] += float(activations[0, 0, 0]) + float(gradients[0, 0, 0])

    generator = torch.Generator().manual_seed(rank)
    seconds = []
    with GradientCapture(model, tracked, touch):
        for step in range(arguments.steps + 1):
            sequences = torch.randint(1, arguments.vocab, (arguments.batch, arguments.tokens), generator=generator).tolist()
            batch = make_batch(sequences)
            start = time.perf_counter()
            backward_log_prob(model, batch, sign=-1.0, fisher="true", seed=step, tracked=tracked)
            if step > 0:
                seconds.append(time.perf_counter() - start)
    figures = {"rank": rank, "seconds_per_step": statistics.mean(seconds), "parameters": total, "parameters_held": held,
               "rss_after_shard_mib": resident, "peak_rss_mib": _memory_mib("VmHWM")}
    Path(results, f"{rank}.json").write_text(json.dumps(figures))
    if engine != "none":
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(engine: str, arguments: argparse.Namespace) -> list[dict]:
    """Each rank's figures for one engine."""
    with tempfile.TemporaryDirectory() as results:
        if engine == "none":
            # Its own process too, so that its peak memory is not the parent's.
            mp.spawn(_run, args=(1, 0, engine, arguments, results), nprocs=1)
        else:
            mp.spawn(_run, args=(arguments.world_size, _free_port(), engine, arguments, results), nprocs=arguments.world_size)
        return [json.loads(path.read_text()) for path in sorted(Path(results).glob("*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=50_304)
    arguments = parser.parse_args()
    print("| engine | rank | s/step | parameters held | RSS after sharding (MiB) | peak RSS in steps (MiB) |")
    print("|---|---|---|---|---|---|")
    for engine in arguments.engines:
        for figures in measure(engine, arguments):
            share = figures["parameters_held"] / figures["parameters"]
            print(f"| {engine} | {figures['rank']} | {figures['seconds_per_step']:.2f} | "
                  f"{figures['parameters_held'] / 1e6:.1f}M of {figures['parameters'] / 1e6:.1f}M ({share:.2f}) | "
                  f"{figures['rss_after_shard_mib']:.0f} | {figures['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
