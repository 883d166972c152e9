"""Build the embedded demo: synthetic fact corpus, word-level tokenizer, tiny GPT-NeoX.

`ensure_demo()` builds everything once and caches it under a folder named by a
hash of the configuration, so every job can default to the demo without
retraining. Run `python -m attribution.demo.train` to build it and print the
paths and how many query facts the model has memorised.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from attribution.data.batching import batch_queries, sequence_log_prob
from attribution.data.corpus import Skip
from attribution.data.queries import Query
from attribution.demo.corpus import DemoCorpusConfig, DemoData, generate_demo, write_demo

# Bump when the generator or the training code changes what a config produces,
# so stale caches are not reused.
DEMO_VERSION = 2

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"


@dataclass
class DemoModelConfig:
    """Shape of the tiny GPT-NeoX; defaults mirrored in conf/demo/default.yaml."""

    hidden_size: int = 96
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 128


@dataclass
class DemoTrainConfig:
    """Pretraining hyper-parameters; defaults mirrored in conf/demo/default.yaml."""

    seed: int = 0
    epochs: int = 20
    batch_size: int = 16
    learning_rate: float = 3e-3
    min_learning_rate: float = 1e-4
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_length: int = 128


@dataclass
class DemoFinetuneConfig:
    """Fine-tuning of the pretrained demo model on the question-answer set; mirrored in conf/demo/default.yaml."""

    seed: int = 0
    epochs: int = 30
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0


@dataclass
class DemoConfig:
    """Everything that determines the demo's files and models."""

    corpus: DemoCorpusConfig = field(default_factory=DemoCorpusConfig)
    model: DemoModelConfig = field(default_factory=DemoModelConfig)
    train: DemoTrainConfig = field(default_factory=DemoTrainConfig)
    finetune: DemoFinetuneConfig = field(default_factory=DemoFinetuneConfig)

    @classmethod
    def from_dict(cls, values: Mapping) -> DemoConfig:
        """Build from a plain nested mapping (e.g. the YAML); missing keys keep defaults."""
        sections = {"corpus": DemoCorpusConfig, "model": DemoModelConfig, "train": DemoTrainConfig,
                    "finetune": DemoFinetuneConfig}
        unknown = set(values) - set(sections)
        if unknown:
            raise ValueError(f"unknown demo config sections: {sorted(unknown)}")
        return cls(**{key: _section(kind, values.get(key) or {}, key)
                      for key, kind in sections.items()})

    def fingerprint(self) -> str:
        """A short hash of the config and DEMO_VERSION, naming its cache folder."""
        payload = json.dumps({"version": DEMO_VERSION, "config": asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass
class DemoPaths:
    """Where a built demo lives."""

    root: Path
    model_dir: Path
    finetuned_model_dir: Path
    corpus_dir: Path
    queries_path: Path
    finetune_path: Path
    finetune_queries_path: Path
    summary_path: Path

    @classmethod
    def under(cls, root: Path) -> DemoPaths:
        """The fixed layout of a demo folder."""
        return cls(root=root, model_dir=root / "model", finetuned_model_dir=root / "finetuned",
                   corpus_dir=root / "corpus",
                   queries_path=root / "queries.jsonl", finetune_path=root / "finetune.jsonl",
                   finetune_queries_path=root / "finetune_queries.jsonl",
                   summary_path=root / "summary.json")


@dataclass
class TrainResult:
    """Figures from one pretraining run."""

    num_parameters: int
    final_loss: float
    seconds: float


def ensure_demo(root: Path | None = None, config: DemoConfig | None = None) -> DemoPaths:
    """Return the demo for `config`, building and caching it on first use (`build_once`)."""
    config = config or DemoConfig()
    root = Path(root) if root is not None else default_cache_root()
    final = root / f"v{DEMO_VERSION}-{config.fingerprint()}"
    build_once(final, lambda staging: build_demo(staging, config))
    return DemoPaths.under(final)


def build_once(final: Path, build: Callable[[Path], object]) -> None:
    """Unless `final` exists, `build(staging)` in a folder beside it and rename that into place.

    A crash never leaves a half-built folder at `final`; when two processes race, the second
    rename fails and the loser uses the winner's.
    """
    if final.is_dir():
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(staging)
        os.rename(staging, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        # Success renamed it away; otherwise it is a failed build or a lost race.
        shutil.rmtree(staging, ignore_errors=True)


def default_cache_root() -> Path:
    """`$ATTRIBUTION_CACHE/demo`, else `~/.cache/attribution/demo`."""
    base = os.environ.get("ATTRIBUTION_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "attribution") / "demo"


def build_demo(directory: Path, config: DemoConfig) -> DemoPaths:
    """Generate the data, train the model and write everything under `directory`.

    Trained on one torch thread whatever the calling process uses: the order of float sums
    differs with the thread count, and the cached demo (hence every figure and the README's
    example output) must not depend on which process happened to build it first.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build_demo(Path(directory), config)
    finally:
        torch.set_num_threads(threads)


def _build_demo(directory: Path, config: DemoConfig) -> DemoPaths:
    paths = DemoPaths.under(directory)
    data = generate_demo(config.corpus)
    write_demo(data, paths.root, config.corpus.num_shards)
    tokenizer = build_tokenizer(_all_texts(data))
    tokenizer.model_max_length = config.model.max_position_embeddings
    model, result = pretrain([row["text"] for row in data.corpus], tokenizer,
                             config.model, config.train)
    model.save_pretrained(paths.model_dir)
    tokenizer.save_pretrained(paths.model_dir)
    query_accuracy = fact_accuracy(model, tokenizer, data.queries)
    finetuned, finetune_seconds = finetune(model, tokenizer, data.finetune, config.finetune)
    finetuned.save_pretrained(paths.finetuned_model_dir)
    tokenizer.save_pretrained(paths.finetuned_model_dir)
    summary = {**asdict(result), "query_accuracy": query_accuracy,
               "finetune_seconds": finetune_seconds,
               "finetune_train_accuracy": fact_accuracy(finetuned, tokenizer, data.finetune),
               "finetune_query_accuracy": fact_accuracy(finetuned, tokenizer, data.finetune_queries),
               "num_documents": len(data.corpus), "num_queries": len(data.queries),
               "num_finetune": len(data.finetune),
               "num_finetune_queries": len(data.finetune_queries),
               "demo_version": DEMO_VERSION, "config": asdict(config)}
    paths.summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return paths


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `texts`: one token per word or punctuation mark.

    Splitting on whitespace first means " Tarmouth" and "Tarmouth" are the same
    token, so tokenizing a prompt and its completion separately and
    concatenating gives exactly the tokens of the joined string.
    """
    backend = Tokenizer(models.WordLevel(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=[PAD, UNK, EOS]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK,
                                   eos_token=EOS, padding_side="right")


def build_model(tokenizer: PreTrainedTokenizerFast, config: DemoModelConfig) -> GPTNeoXForCausalLM:
    """A freshly initialised GPT-NeoX sized by `config` for `tokenizer`'s vocabulary."""
    neox = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(neox)


def pretrain(texts: list[str], tokenizer: PreTrainedTokenizerFast, model_config: DemoModelConfig,
             train_config: DemoTrainConfig, show_progress: bool = True,
             corpus: CorpusPlaces | None = None) -> tuple[GPTNeoXForCausalLM, TrainResult]:
    """Train a new model from scratch as a causal LM on `texts`, one document per sequence.

    The demo's recipe, also rerun on subsets of the corpus by the counterfactual validation
    (`attribution.counterfactual`): `train_config.seed` fixes the initialisation and the batch order.
    Without `corpus` the batches are drawn over `texts`; with it, `texts` are part of a larger corpus and
    every epoch walks that corpus's batches in the order its own training would (same seed), less the
    documents not given: two parts then differ only in the batches that held the documents they differ in.
    """
    start = time.perf_counter()
    torch.manual_seed(train_config.seed)
    model = build_model(tokenizer, model_config)
    sequences = [ids[: train_config.max_length - 1] + [tokenizer.eos_token_id]
                 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    places = corpus or CorpusPlaces(tuple(range(len(sequences))), len(sequences))
    if len(places.positions) != len(sequences):
        raise ValueError(f"{len(texts)} texts but {len(places.positions)} corpus positions: give one position per text")
    steps_per_epoch = math.ceil(places.size / train_config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.learning_rate,
                                  weight_decay=train_config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(train_config, steps_per_epoch * train_config.epochs))
    generator = torch.Generator().manual_seed(train_config.seed)
    model.train()
    loss_value = math.nan
    progress = tqdm(range(train_config.epochs), desc="demo pretraining", unit="epoch", disable=not show_progress)
    for _ in progress:
        epoch_loss = 0.0
        batches = 0
        for batch in _batches(sequences, train_config.batch_size, tokenizer.pad_token_id, generator, places):
            if batch is not None:
                loss = model(**batch).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
                optimizer.step()
                epoch_loss += loss.item()
                batches += 1
            # An emptied batch still takes its step of the schedule, so later batches keep their learning rate.
            schedule.step()
        loss_value = epoch_loss / max(batches, 1)
        progress.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    result = TrainResult(num_parameters=sum(p.numel() for p in model.parameters()),
                         final_loss=loss_value, seconds=time.perf_counter() - start)
    return model, result


def finetune(model: GPTNeoXForCausalLM, tokenizer: PreTrainedTokenizerFast, rows: list[dict],
             config: DemoFinetuneConfig, show_progress: bool = True) -> tuple[GPTNeoXForCausalLM, float]:
    """Fine-tune all parameters on prompt/completion rows, the loss on completion tokens only.

    Loss per batch: ``-(1/N_answer) sum_n log p(completion_n | prompt_n)``.
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = copy.deepcopy(model)
    queries = [Query(row["id"], row["prompt"], row["completion"]) for row in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    for _ in tqdm(range(config.epochs), desc="demo fine-tuning", unit="epoch", disable=not show_progress):
        order = torch.randperm(len(queries), generator=generator).tolist()
        shuffled = [queries[i] for i in order]
        for batch in batch_queries(tokenizer, shuffled, config.batch_size, tokenizer.model_max_length, _no_skip):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = -sequence_log_prob(logits, batch).sum() / batch.target_mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
    model.eval()
    return model, time.perf_counter() - start


def _no_skip(skip: Skip) -> None:
    raise ValueError(f"demo fine-tuning row {skip.item_id} cannot be used: {skip.reason}")


@torch.no_grad()
def fact_accuracy(model: GPTNeoXForCausalLM, tokenizer: PreTrainedTokenizerFast,
                  queries: list[dict]) -> float:
    """Fraction of queries whose completion tokens are all the greedy (argmax) prediction."""
    if not queries:
        return math.nan
    model.eval()
    hits = 0
    for query in queries:
        prompt = tokenizer(query["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(query["completion"], add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([prompt + completion])).logits[0]
        predicted = logits[len(prompt) - 1: -1].argmax(-1).tolist()
        hits += predicted == completion
    return hits / len(queries)


def _section(kind: type, values: Mapping, name: str) -> object:
    """One config dataclass from a mapping, naming any key it does not have."""
    known = {f.name for f in fields(kind)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown keys in demo.{name}: {sorted(unknown)}")
    return kind(**values)


def _all_texts(data: DemoData) -> list[str]:
    """Every string the demo's tokenizer must cover without <unk>."""
    texts = [row["text"] for row in data.corpus]
    for row in data.finetune + data.queries + data.finetune_queries:
        texts += [row["prompt"], row["completion"]]
    return texts


def _warmup_cosine(config: DemoTrainConfig, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warmup, then cosine decay to min_learning_rate."""
    warmup = max(1, round(config.warmup_fraction * total_steps))
    floor = config.min_learning_rate / config.learning_rate

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


@dataclass(frozen=True)
class CorpusPlaces:
    """Where training texts sit in a corpus of ``size`` documents: text i is document ``positions[i]``."""

    positions: tuple[int, ...]
    size: int

    def __post_init__(self) -> None:
        if len(set(self.positions)) != len(self.positions) or not all(0 <= p < self.size for p in self.positions):
            raise ValueError(f"corpus positions must be distinct places in a corpus of {self.size} documents")


def _batches(sequences: list[list[int]], batch_size: int, pad_id: int, generator: torch.Generator,
             places: CorpusPlaces) -> Iterable[dict[str, torch.Tensor] | None]:
    """One epoch of shuffled, right-padded batches; padding is masked out of attention and loss.

    The shuffle is over the corpus's ``places.size`` documents, cut into batches of ``batch_size``
    places, and each batch keeps the places that hold a given text: ``None`` where it keeps none.
    """
    text_at = dict(zip(places.positions, range(len(sequences))))
    order = torch.randperm(places.size, generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        chunk = [sequences[text_at[p]] for p in order[start: start + batch_size] if p in text_at]
        if not chunk:
            yield None
            continue
        width = max(len(s) for s in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def main() -> None:
    """Build (or reuse) the default demo and print where it is and how well it learnt."""
    torch.set_num_threads(1)
    paths = ensure_demo()
    summary = json.loads(paths.summary_path.read_text())
    for name, value in asdict(paths).items():
        print(f"{name}: {value}")
    print(f"parameters: {summary['num_parameters']:,}  final loss: {summary['final_loss']:.4f}  "
          f"training seconds: {summary['seconds']:.0f}")
    print(f"documents: {summary['num_documents']}  queries: {summary['num_queries']}  "
          f"query fact accuracy (greedy): {summary['query_accuracy']:.3f}")
    print(f"fine-tuned in {summary['finetune_seconds']:.0f} s: accuracy on its {summary['num_finetune']} "
          f"training questions {summary['finetune_train_accuracy']:.3f}, on {summary['num_finetune_queries']} "
          f"held-out fact questions {summary['finetune_query_accuracy']:.3f}")


if __name__ == "__main__":
    main()
