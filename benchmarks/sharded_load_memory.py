"""Each worker's peak host memory (RSS) when loading a model sharded over 2 CPU workers (gloo, loopback).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sharded_load_memory.py build /tmp/neox-200m
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sharded_load_memory.py sharded /tmp/neox-200m
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sharded_load_memory.py whole /tmp/neox-200m

``build`` saves a random GPT-NeoX (hidden 1024, 8 blocks, vocabulary 50,000, untied unembedding:
203M parameters, 775 MiB in float32) once. ``sharded`` loads it with
:func:`attribution.distributed.sharded_load.load_sharded_model`; ``whole`` as the fit does without it
(``load_model``, ``check_parameters``, ``model_fingerprint``, then ``shard_model``). Each rank prints
its peak RSS (``ru_maxrss``): for ``sharded`` also just before the load's causal-attention check,
whose forward gathers each FSDP unit (on the CPU, into host memory), and for both after one more
forward, as a fit's first step.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLD_SIZE = 2
VOCAB = 50_000


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(directory: str) -> None:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from attribution.demo.train import build_tokenizer

    tokenizer = build_tokenizer(["the cat sat on the mat", "a dog ran in the park"])
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                           intermediate_size=4096, max_position_embeddings=256, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    print(f"{sum(p.numel() for p in model.parameters())} parameters")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def worker(rank: int, listener, port: int, mode: str, directory: str) -> None:
    import torch.distributed as dist

    from attribution.distributed.cluster import init_process_group

    torch.set_num_threads(1)
    if rank:
        listener.close()
    init_process_group(rank, WORLD_SIZE, "127.0.0.1", port, listener if rank == 0 else None, use_gpu=False)
    if mode == "sharded":
        from attribution.distributed import sharded_load

        check_causal = sharded_load.check_causal

        def reported(model, where):
            # Every shard is filled by now: the rest of the peak is the check's forward.
            print(f"sharded rank {rank}: peak RSS before the causal check {peak_mib():.0f} MiB", flush=True)
            check_causal(model, where)

        sharded_load.check_causal = reported
        model = sharded_load.load_sharded_model(directory, False, torch.float32, "cpu").model
    else:
        from attribution.curvature.finite import check_parameters
        from attribution.distributed.sharding import shard_model
        from attribution.models import load_model, model_fingerprint

        model, _ = load_model(directory)
        check_parameters(model, directory)
        model_fingerprint(model)
        shard_model(model)
    held = sum(parameter.to_local().numel() for parameter in model.parameters())
    print(f"{mode} rank {rank}: peak RSS after the load {peak_mib():.0f} MiB (parameter elements held: {held})", flush=True)
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0)))
    print(f"{mode} rank {rank}: peak RSS after one more forward {peak_mib():.0f} MiB", flush=True)
    dist.destroy_process_group()


def main() -> None:
    mode, directory = sys.argv[1], sys.argv[2]
    if mode == "build":
        build(directory)
        return
    from attribution.distributed.cluster import listening_socket

    listener = listening_socket("127.0.0.1")
    mp.spawn(worker, args=(listener, listener.getsockname()[1], mode, directory), nprocs=WORLD_SIZE)


if __name__ == "__main__":
    main()
