"""The benchmarks the counterfactual validation runs on: a model, the corpus it was trained on, queries,
and the recipe that retrains it on a subset.

``demo``: the embedded synthetic-facts demo (:mod:`attribution.demo`), its cloze queries; with its
fine-tuning stage (``finetune_stage=true``), every retrained model is fine-tuned on the demo's QA rows and
the queries are the held-out questions about facts seen only in pretraining documents.

``natural_text``: natural English from the Debian package ``fortunes``
(:mod:`attribution.counterfactual.natural_text`), a byte-level BPE tokenizer trained on the corpus,
and a tiny GPT-NeoX trained briefly on it with the demo's recipe (:func:`attribution.demo.train.pretrain`,
a few epochs, not to memorisation); the queries are the ends of held-out passages. Its fine-tuning
stage fine-tunes that model with the demo's fine-tuning recipe on passages after the corpus, framed as
a task (:data:`~attribution.counterfactual.natural_text.FINETUNE_PROMPT`), and its queries are the
held-out passages in that frame, measured on the fine-tuned model. Built once and
cached under ``$ATTRIBUTION_CACHE/natural_text/v<version>-<hash of the config>`` (trained on one
torch thread, like the demo, so the model does not depend on the process that built it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from attribution.counterfactual.measure import measure_queries
from attribution.counterfactual.natural_text import NaturalTextCorpusConfig, natural_text, write_natural_text
from attribution.counterfactual.retrain import Recipe
from attribution.data.queries import Query
from attribution.demo.train import (
    EOS,
    PAD,
    DemoConfig,
    DemoFinetuneConfig,
    DemoModelConfig,
    DemoTrainConfig,
    build_once,
    default_cache_root,
    ensure_demo,
    finetune,
    pretrain,
)
from attribution.settings import SettingsError

BENCHMARKS = ("demo", "natural_text")
# Bump when the reader, the tokenizer or the training code changes what a config builds.
NATURAL_TEXT_VERSION = 1


@dataclass(frozen=True)
class NaturalTextConfig:
    """Everything that determines the natural-text benchmark. conf/natural_text/default.yaml sets the sizes
    (the model and training keys default to the demo's here)."""

    corpus: NaturalTextCorpusConfig = field(default_factory=NaturalTextCorpusConfig)
    vocab_size: int = 1024
    model: DemoModelConfig = field(default_factory=DemoModelConfig)
    train: DemoTrainConfig = field(default_factory=DemoTrainConfig)
    finetune: DemoFinetuneConfig = field(default_factory=DemoFinetuneConfig)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> NaturalTextConfig:
        sections = {"corpus": NaturalTextCorpusConfig, "model": DemoModelConfig, "train": DemoTrainConfig,
                    "finetune": DemoFinetuneConfig}
        known = {*sections, "vocab_size"}
        unknown = set(values) - known
        if unknown:
            raise SettingsError(f"unknown key(s) in natural_text: {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(sorted(known))}")
        built: dict[str, Any] = {}
        for name, kind in sections.items():
            section = dict(values.get(name) or {})
            names = {f.name for f in fields(kind)}
            if set(section) - names:
                raise SettingsError(f"unknown key(s) in natural_text.{name}: {', '.join(sorted(set(section) - names))}; "
                                    f"known: {', '.join(sorted(names))}")
            try:
                built[name] = kind(**section)
            except ValueError as error:
                raise SettingsError(str(error)) from error
        vocab = values.get("vocab_size", cls.vocab_size)
        if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 300:
            raise SettingsError(f"natural_text.vocab_size={vocab!r}: expected an integer of at least 300 (256 bytes + merges)")
        return cls(vocab_size=vocab, **built)

    def fingerprint(self) -> str:
        payload = json.dumps({"version": NATURAL_TEXT_VERSION, "config": asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class FinetuneStage:
    """A benchmark's fine-tuning stage: the fine-tuned model being attributed and its fine-tuning rows."""

    model_dir: Path
    rows_path: Path


@dataclass(frozen=True)
class BenchmarkInputs:
    """Where a benchmark's model, corpus and queries are, and how to retrain its model on a subset
    (``finetune``: the fine-tuning stage, when the run asked for it)."""

    name: str
    model_dir: Path
    corpus_dir: Path
    queries_path: Path
    recipe: Recipe
    finetune: FinetuneStage | None = None


def prepare_benchmark(name: str, demo: Mapping[str, Any], natural: Mapping[str, Any], finetune: bool = False) -> BenchmarkInputs:
    """Build (or reuse) benchmark ``name`` from its config section (``demo`` or ``natural_text``), with its
    fine-tuning stage when ``finetune``."""
    if name == "demo":
        config = DemoConfig.from_dict(demo)
        paths = ensure_demo(config=config)
        recipe = Recipe(config.model, config.train, config.fingerprint(), str(paths.model_dir), str(paths.corpus_dir))
        if not finetune:
            return BenchmarkInputs(name, paths.model_dir, paths.corpus_dir, paths.queries_path, recipe)
        recipe = replace(recipe, finetune=config.finetune, finetune_rows=str(paths.finetune_path))
        return BenchmarkInputs(name, paths.model_dir, paths.corpus_dir, paths.finetune_queries_path, recipe,
                               FinetuneStage(paths.finetuned_model_dir, paths.finetune_path))
    if name == "natural_text":
        config = NaturalTextConfig.from_dict(natural)
        if finetune and config.corpus.num_finetune == 0:
            raise SettingsError("finetune_stage=true: natural_text.corpus.num_finetune=0 gives the fine-tuning stage no rows")
        root = default_cache_root().parent / "natural_text" / f"v{NATURAL_TEXT_VERSION}-{config.fingerprint()}"
        # Read before building: a missing package is one line, not a failed build.
        data = natural_text(config.corpus)
        build_once(root, lambda staging: _build_natural_text(staging, config, data))
        recipe = Recipe(config.model, config.train, config.fingerprint(), str(root / "model"), str(root / "corpus"))
        if not finetune:
            return BenchmarkInputs(name, root / "model", root / "corpus", root / "queries.jsonl", recipe)
        recipe = replace(recipe, finetune=config.finetune, finetune_rows=str(root / "finetune.jsonl"))
        return BenchmarkInputs(name, root / "model", root / "corpus", root / "finetune_queries.jsonl", recipe,
                               FinetuneStage(root / "finetuned", root / "finetune.jsonl"))
    raise SettingsError(f"benchmark={name!r}: expected one of {', '.join(BENCHMARKS)}")


def build_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``: every string is covered (no unknown token), and a
    word with its leading space is one pre-token, so a prompt and a completion that starts with a space
    tokenize separately exactly as they do joined."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, padding_side="right")


def _build_natural_text(directory: Path, config: NaturalTextConfig, data: Any) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        texts = [row["text"] for row in data.corpus]
        tokenizer = build_tokenizer(texts, config.vocab_size)
        # Counted before the length limit is set: documents are truncated in training, not here.
        tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        tokenizer.model_max_length = config.model.max_position_embeddings
        # Fine-tuning rows are whole (prompt + completion) or not used: a longer row would be cut.
        rows = [row for row in data.finetune
                if len(tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"])
                <= tokenizer.model_max_length]
        data = replace(data, finetune=rows)
        write_natural_text(data, directory, config.corpus.num_shards)
        model, result = pretrain(texts, tokenizer, config.model, config.train, show_progress=False)
        model.save_pretrained(directory / "model")
        tokenizer.save_pretrained(directory / "model")
        summary = {**asdict(result), "num_documents": len(data.corpus), "num_queries": len(data.queries),
                   "corpus_tokens": tokens, "vocab_size": len(tokenizer), "version": NATURAL_TEXT_VERSION,
                   "config": asdict(config)}
        if data.finetune:
            summary.update(_finetune_stage(directory, model, tokenizer, data, config.finetune))
        (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        torch.set_num_threads(threads)


def _finetune_stage(directory: Path, model: Any, tokenizer: Any, data: Any, config: DemoFinetuneConfig) -> dict[str, Any]:
    """Fine-tune on the framed rows into ``finetuned/``; the framed queries' mean ``log p`` before and after
    (queries over the model's length are left out, as the job leaves them out)."""
    tuned, seconds = finetune(model, tokenizer, data.finetune, config, show_progress=False)
    tuned.save_pretrained(directory / "finetuned")
    tokenizer.save_pretrained(directory / "finetuned")
    queries = [Query(row["id"], row["prompt"], row["completion"]) for row in data.finetune_queries]

    def mean_log_prob(which: Any) -> float:
        values = measure_queries(which, tokenizer, queries, tokenizer.model_max_length, lambda skip: None)
        return sum(values.values()) / max(len(values), 1)

    return {"num_finetune_rows": len(data.finetune), "finetune_seconds": seconds,
            "finetune_queries_log_prob_pretrained": mean_log_prob(model),
            "finetune_queries_log_prob_finetuned": mean_log_prob(tuned)}
