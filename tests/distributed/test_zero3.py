"""DeepSpeed ZeRO-3 sharding (two processes, gloo on loopback): the capture sees what it sees unsharded."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from attribution.models import TrackedModule, find_tracked_modules
from tests.tiny import make_batch, random_sequences, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")

WORLD_SIZE = 2
STEPS = 2


def _capture(model: torch.nn.Module, tracked: list[TrackedModule], seed: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Per tracked module ``sum_t ds_t a_t^T`` over ``STEPS`` batches, and each batch's log-probabilities."""
    from attribution.curvature.capture import GradientCapture
    from attribution.log_prob import backward_log_prob

    sums: dict[str, torch.Tensor] = {}

    def add(module: TrackedModule, activations: torch.Tensor, gradients: torch.Tensor) -> None:
        product = torch.einsum("bto,bti->oi", gradients, activations)
        sums[module.name] = sums[module.name] + product if module.name in sums else product

    log_probs = []
    with GradientCapture(model, tracked, add, dtype=torch.float64):
        for step in range(STEPS):
            # Each rank its own batches, of other lengths: ZeRO-3 needs only the same number of passes.
            batch = make_batch(random_sequences(2 + step, seed=100 * seed + step))
            log_probs.append(backward_log_prob(model, batch, sign=-1.0, tracked=tracked))
    return sums, log_probs


def _worker(rank: int, port: int) -> None:
    import torch.distributed as dist

    from attribution.distributed.sharding import parameters_held
    from attribution.distributed.zero3 import shard_with_zero3

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        for architecture in ("gpt_neox", "llama"):
            # DeepSpeed keeps ZeRO-3 parameters in float32 at most.
            reference = tiny_model(architecture, dtype=torch.float32)
            expected_sums, expected_log_probs = _capture(reference, find_tracked_modules(reference), rank)
            total = parameters_held(reference)

            model = tiny_model(architecture, dtype=torch.float32)
            tracked = find_tracked_modules(model)
            sharded = shard_with_zero3(model)
            held = parameters_held(model)
            assert held <= 0.6 * total, f"{architecture}: rank {rank} holds {held} of {total} parameter elements"
            sums, log_probs = _capture(model, tracked, rank)
            assert sums.keys() == expected_sums.keys()
            for name, expected in expected_sums.items():
                torch.testing.assert_close(sums[name], expected, rtol=1e-5, atol=1e-7, msg=f"{architecture} {name}")
            for actual, expected in zip(log_probs, expected_log_probs):
                torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
            # Gathered only while a module runs: after the passes, the partitions again.
            assert parameters_held(model) == held
            sharded.close()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_zero3_capture_equals_unsharded():
    """GPT-NeoX and Llama, two ranks: each rank's per-module ``sum_t ds_t a_t^T`` and log-probabilities
    equal the unsharded model's on the same batches, and each holds at most 0.6x of the parameters."""
    pytest.importorskip("deepspeed")
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD_SIZE)


def test_zero3_refuses_what_it_cannot_shard():
    """No process group, or float64 parameters (DeepSpeed keeps float32 at most): a one-line UserError."""
    import torch.distributed as dist

    from attribution.distributed.cluster import init_process_group, listening_socket
    from attribution.distributed.zero3 import Zero3Error, shard_with_zero3

    with pytest.raises(Zero3Error, match="needs an initialised torch.distributed process group"):
        shard_with_zero3(tiny_model(dtype=torch.float32))
    listener = listening_socket("127.0.0.1")
    init_process_group(0, 1, "127.0.0.1", listener.getsockname()[1], listener, use_gpu=False)
    try:
        with pytest.raises(Zero3Error, match=r"cluster.sharding=deepspeed: .* not torch.float64"):
            shard_with_zero3(tiny_model(dtype=torch.float64))
    finally:
        dist.destroy_process_group()
