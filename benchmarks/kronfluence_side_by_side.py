"""The reference EK-FAC library (kronfluence) on the same model, documents, queries, rank and damping as ``jobs.score``.

    python benchmarks/kronfluence_side_by_side.py --model DIR --corpus DIR --queries FILE --output DIR
        [--rank 32] [--max-length 128] [--batch-size 8] [--query-batch-size 150] [--fit-sequences N] [--top-k 10]

Both sides use this project's tokenization and objectives: a document's training loss is
``-log p(z)`` summed over its tokens (labels sampled from the model when fitting, the true
Fisher), a query's measurement ``log p(completion | prompt)``; the tracked modules are
``attribution``'s; the damping is 0.1 x the mean eigenvalue per module in both; query
gradients are compressed to ``--rank``. kronfluence's score is ``<P grad m(q), grad loss(z)>``,
so it is the negative of ours.

Writes ``<output>/kronfluence.json`` (seconds of each stage, counts) and
``<output>/kronfluence_scores.safetensors`` (the (queries, documents) matrix, rows and columns in
the order of ``query_ids`` and ``doc_ids`` in the JSON). Needs the optional ``bench`` extra.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs
from safetensors.torch import save_file

from attribution.data.batching import TokenBatch, batch_documents, batch_queries, sequence_log_prob
from attribution.data.corpus import iter_documents, list_shards
from attribution.data.queries import read_queries
from attribution.models import find_tracked_modules, load_model


def items(batches) -> tuple[list[str], list[dict[str, torch.Tensor]]]:
    """The ids and one dataset item per sequence, unpadded (batches of one)."""
    batches = list(batches)
    return [b.ids[0] for b in batches], [{"input_ids": b.input_ids[0], "target_mask": b.target_mask[0]} for b in batches]


def collate(pad: int):
    """Right-pad a list of items into a dict of tensors (what kronfluence's loaders move and count)."""

    def pad_batch(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        targets = torch.zeros((len(rows), width), dtype=torch.bool)
        for index, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[index, :length] = row["input_ids"]
            attention[index, :length] = 1
            targets[index, :length] = row["target_mask"]
        return {"input_ids": input_ids, "attention_mask": attention, "target_mask": targets}

    return pad_batch


def token_batch(batch: dict[str, torch.Tensor]) -> TokenBatch:
    count = len(batch["input_ids"])
    return TokenBatch([""] * count, [""] * count, batch["input_ids"], batch["attention_mask"], batch["target_mask"],
                      [False] * count)


class LanguageModelling(Task):
    """``-log p(z)`` to train on, ``log p(completion | prompt)`` to measure, over attribution's tracked modules."""

    def __init__(self, modules: list[str]) -> None:
        self.modules = modules

    def compute_train_loss(self, batch: dict, model: torch.nn.Module, sample: bool = False) -> torch.Tensor:
        batch = token_batch(batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        if not sample:
            return -sequence_log_prob(logits, batch).sum()
        with torch.no_grad():
            sampled = torch.distributions.Categorical(logits=logits[:, :-1].float()).sample()
        labelled = TokenBatch(batch.ids, batch.shards, torch.cat([batch.input_ids[:, :1], sampled], dim=1),
                              batch.attention_mask, batch.target_mask, batch.truncated)
        return -sequence_log_prob(logits, labelled).sum()

    def compute_measurement(self, batch: dict, model: torch.nn.Module) -> torch.Tensor:
        batch = token_batch(batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return sequence_log_prob(logits, batch).sum()

    def get_influence_tracked_modules(self) -> list[str]:
        return self.modules

    def get_attention_mask(self, batch: dict) -> torch.Tensor:
        return batch["attention_mask"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, kind, default in (("--model", str, None), ("--corpus", str, None), ("--queries", str, None),
                                ("--output", str, None), ("--rank", int, 32), ("--max-length", int, 128),
                                ("--batch-size", int, 8), ("--query-batch-size", int, 150), ("--fit-sequences", int, None),
                                ("--top-k", int, 10)):
        parser.add_argument(name, type=kind, default=default, required=default is None and name != "--fit-sequences")
    args = parser.parse_args()
    torch.set_num_threads(1)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ignore = lambda skip: None  # noqa: E731
    model, tokenizer = load_model(args.model)
    modules = [m.name for m in find_tracked_modules(model)]
    documents = list(iter_documents(list_shards(args.corpus), on_skip=ignore))
    queries = read_queries(args.queries, on_skip=ignore)
    doc_ids, train = items(batch_documents(tokenizer, documents, 1, args.max_length, ignore))
    query_ids, query_items = items(batch_queries(tokenizer, queries, 1, args.max_length, ignore))
    task = LanguageModelling(modules)
    model = prepare_model(model, task)
    analyzer = Analyzer("side_by_side", model, task, cpu=True, disable_tqdm=True, output_dir=str(output / "kronfluence"))
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate(tokenizer.pad_token_id or 0)))
    seconds = {"setup": time.perf_counter() - started}
    clock = time.perf_counter()
    fit_items = train[: args.fit_sequences] if args.fit_sequences else train
    analyzer.fit_all_factors("ekfac", fit_items, per_device_batch_size=args.batch_size,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    seconds["fit"] = time.perf_counter() - clock
    clock = time.perf_counter()
    analyzer.compute_pairwise_scores("pairs", "ekfac", query_items, train, per_device_query_batch_size=args.query_batch_size,
                                     per_device_train_batch_size=args.batch_size,
                                     score_args=ScoreArguments(damping_factor=None, query_gradient_low_rank=args.rank),
                                     overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("pairs")["all_modules"]
    seconds["score"] = time.perf_counter() - clock
    clock = time.perf_counter()
    torch.topk(-scores, args.top_k, dim=1)
    seconds["top_k"] = time.perf_counter() - clock
    seconds["process"] = time.perf_counter() - started
    save_file({"scores": scores.contiguous()}, output / "kronfluence_scores.safetensors")
    summary = {"seconds": seconds, "documents": len(train), "queries": len(query_items), "rank": args.rank,
               "doc_ids": doc_ids, "query_ids": query_ids}
    (output / "kronfluence.json").write_text(json.dumps(summary))
    print(json.dumps({key: value for key, value in summary.items() if not key.endswith("_ids")}))


if __name__ == "__main__":
    main()
