"""A short DeepSpeed ZeRO training run on CPU, as a user's run leaves its checkpoint folder.

``python -m tests.zero_training MODEL_DIR ZERO_DIR GATHERED_DIR --stage 3`` trains the Hugging Face
model in MODEL_DIR for two Adam steps on two ranks (gloo, on loopback), then:

- ZERO_DIR: ``engine.save_checkpoint`` (``latest``, ``global_step2/`` with each rank's files) plus
  the model's ``config.json`` and tokenizer, saved beside it as the Hugging Face Trainer does;
- GATHERED_DIR: the trained weights gathered from the ranks' live parameters (not from the
  checkpoint files) and saved with ``save_pretrained``: the reference the consolidated
  checkpoint must equal.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

WORLD_SIZE = 2
STEPS = 2


def _train(rank: int, model_dir: str, zero_dir: str, gathered_dir: str, stage: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # DeepSpeed's CPU accelerator would first compile its shared-memory all-reduce with g++ (~45 s);
    # gloo alone does the few collectives of this run.
    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    deepspeed.init_distributed(dist_backend="gloo")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        # DeepSpeed's fused Adam is a compiled op; torch's Adam runs on the CPU as it is.
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10_000,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=generator)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    engine.save_checkpoint(zero_dir)
    # ZeRO-3 holds each parameter in pieces over the ranks; inside this context every rank has it whole.
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    if rank == 0:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model.config.save_pretrained(zero_dir)
        tokenizer.save_pretrained(zero_dir)
        gathered = AutoModelForCausalLM.from_config(model.config)
        gathered.load_state_dict(state)
        gathered.save_pretrained(gathered_dir)
        tokenizer.save_pretrained(gathered_dir)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("zero_dir")
    parser.add_argument("gathered_dir")
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), default=3)
    arguments = parser.parse_args()
    Path(arguments.zero_dir).mkdir(parents=True, exist_ok=True)
    mp.spawn(_train, args=(arguments.model_dir, arguments.zero_dir, arguments.gathered_dir, arguments.stage, _free_port()),
             nprocs=WORLD_SIZE)


if __name__ == "__main__":
    main()
