"""A natural-English corpus and held-out queries from the Debian package ``fortunes``, read where it is installed.

``fortunes`` (``apt-get install -y fortunes``) ships about 15,000 quotations, literature passages,
definitions, poems and jokes as plain-text files under ``/usr/share/games/fortunes``, one entry
per ``%``-separated block. Nothing is downloaded at run time: the package is the data.

Cleaning: an attribution line (``-- Author``) and what follows it are cut; whitespace is collapsed
(the files wrap lines at 70-80 columns); an entry is kept when it has ``min_words`` to ``max_words``
words, no undecodable byte, and at least ``min_letters`` of its non-space characters are letters
(code, tables and ASCII art are not prose). Duplicates
(the same words, ignoring case and punctuation) are kept once, the first in file order.

Split: the kept passages, in a fixed order (sorted, then shuffled with ``seed``), give the first
``num_queries`` passages long enough for a prompt of at least ``min_prompt_words`` words as
held-out queries, the rest (at most ``max_documents``) as the training corpus. A query is its
passage cut before its last ``completion_words`` words: ``prompt`` the words before, ``completion``
the last words with their leading space, so ``prompt + completion`` is the passage and the
measurement ``log p(completion | prompt)`` is how well a model predicts the end of unseen prose.

The fine-tuning stage's rows are the next ``num_finetune`` passages after the corpus (so the corpus and
the queries do not depend on it), cut the same way and framed as a task the corpus never shows:
``prompt`` becomes ``FINETUNE_PROMPT.format(prompt)``. The fine-tuning queries are the held-out
queries in the same frame: what a fine-tuned model answers, with English learnt from the corpus.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from attribution.errors import UserError
from attribution.settings import SettingsError

PACKAGE = "fortunes"
INSTALL = "apt-get install -y fortunes"
DEFAULT_SOURCE = "/usr/share/games/fortunes"
# Files of the package that are pictures, not text.
PICTURES = ("ascii-art",)

# The fine-tuning task's frame: finish the passage after an arrow. The completion keeps its leading space.
FINETUNE_PROMPT = "Finish the passage: {} =>"

_SEPARATOR = re.compile(r"^%\s*$", re.MULTILINE)
_WORD = re.compile(r"[a-z0-9]+")
# The attribution line under a quotation ("    -- Mark Twain, ..."): who said it is not the passage's prose.
_ATTRIBUTION = re.compile(r"\n\s*--\s")


class MissingPackageError(UserError):
    """The package the corpus is read from is not installed."""


@dataclass(frozen=True)
class NaturalTextCorpusConfig:
    """How the corpus and queries are cut from the package; defaults mirrored in conf/natural_text/default.yaml."""

    source: str = DEFAULT_SOURCE
    seed: int = 0
    min_words: int = 12
    max_words: int = 60
    min_letters: float = 0.7
    num_queries: int = 32
    completion_words: int = 5
    min_prompt_words: int = 10
    max_documents: int | None = 5000
    num_shards: int = 4
    num_finetune: int = 2000

    def __post_init__(self) -> None:
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"natural_text.corpus: need 1 <= min_words ({self.min_words}) <= max_words ({self.max_words})")
        if self.min_prompt_words + self.completion_words > self.max_words:
            raise ValueError("natural_text.corpus: min_prompt_words + completion_words must not exceed max_words")
        if self.num_queries < 1 or self.completion_words < 1 or self.min_prompt_words < 1 or self.num_shards < 1:
            raise ValueError("natural_text.corpus: num_queries, completion_words, min_prompt_words and num_shards "
                             "must be positive")
        if not 0.0 <= self.min_letters <= 1.0:
            raise ValueError(f"natural_text.corpus.min_letters={self.min_letters}: expected a share between 0 and 1")
        if self.num_finetune < 0:
            raise ValueError(f"natural_text.corpus.num_finetune={self.num_finetune}: expected 0 or more fine-tuning rows")
        if self.max_documents is not None and self.max_documents < 2:
            raise ValueError("natural_text.corpus.max_documents: expected at least 2 or null (every passage)")


@dataclass(frozen=True)
class NaturalTextData:
    """The training corpus (``id``, ``text`` rows), the held-out queries (``id``, ``prompt``, ``completion``),
    the fine-tuning rows and the queries in the fine-tuning frame (the same columns)."""

    corpus: list[dict]
    queries: list[dict]
    finetune: list[dict]
    finetune_queries: list[dict]


def read_passages(source: str | Path) -> list[str]:
    """Every entry of the package's text files, attribution cut and whitespace collapsed, in file-name then file order."""
    folder = Path(source)
    files = sorted(p for p in folder.glob("*") if p.is_file() and not p.is_symlink() and not p.suffix
                   and p.name not in PICTURES) if folder.is_dir() else []
    if not files:
        raise MissingPackageError(f"no {PACKAGE} text files under {folder}: the natural-text benchmark reads the Debian "
                                  f"package {PACKAGE}; install it with `{INSTALL}` (or set natural_text.corpus.source)")
    passages = []
    for file in files:
        for entry in _SEPARATOR.split(file.read_text(encoding="utf-8", errors="replace")):
            text = " ".join(_ATTRIBUTION.split(entry, maxsplit=1)[0].split())
            if text:
                passages.append(text)
    return passages


def clean(passages: list[str], config: NaturalTextCorpusConfig) -> list[str]:
    """The prose passages of the right length, each once (see the module docstring)."""
    seen: set[str] = set()
    kept = []
    for text in passages:
        words = text.split()
        if not config.min_words <= len(words) <= config.max_words or "\ufffd" in text:
            continue
        visible = text.replace(" ", "")
        if sum(c.isalpha() for c in visible) < config.min_letters * len(visible):
            continue
        key = " ".join(_WORD.findall(text.lower()))
        if key in seen:
            continue
        seen.add(key)
        kept.append(text)
    return kept


def split(passages: list[str], config: NaturalTextCorpusConfig) -> NaturalTextData:
    """Held-out queries, the training corpus and the fine-tuning rows, deterministic for the passages and
    ``config.seed``."""
    order = sorted(passages)
    random.Random(config.seed).shuffle(order)
    queries, corpus, finetune = [], [], []
    for text in order:
        words = text.split()
        long_enough = len(words) >= config.min_prompt_words + config.completion_words
        if len(queries) < config.num_queries and long_enough:
            queries.append(_cut(f"q-{len(queries) + 1:04d}", words, config.completion_words))
        elif config.max_documents is None or len(corpus) < config.max_documents:
            corpus.append({"id": f"doc-{len(corpus):05d}", "text": text})
        elif len(finetune) < config.num_finetune and long_enough:
            finetune.append(_framed(_cut(f"ft-{len(finetune):05d}", words, config.completion_words)))
    if len(queries) < config.num_queries or len(corpus) < 2 or len(finetune) < config.num_finetune:
        raise SettingsError(f"natural_text.corpus: {len(passages)} passages give {len(queries)} of {config.num_queries} queries, "
                            f"{len(corpus)} documents and {len(finetune)} of {config.num_finetune} fine-tuning rows; "
                            "lower num_queries, max_documents or num_finetune, or widen min_words/max_words")
    return NaturalTextData(corpus, queries, finetune, [_framed(query) for query in queries])


def _cut(row_id: str, words: list[str], completion_words: int) -> dict:
    """A passage as a query: the last ``completion_words`` words, with their leading space, are the completion."""
    cut = len(words) - completion_words
    return {"id": row_id, "prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut:])}


def _framed(row: dict) -> dict:
    return {**row, "prompt": FINETUNE_PROMPT.format(row["prompt"])}


def natural_text(config: NaturalTextCorpusConfig) -> NaturalTextData:
    """Read, clean and split the package's passages."""
    return split(clean(read_passages(config.source), config), config)


def write_natural_text(data: NaturalTextData, directory: Path, num_shards: int) -> None:
    """Corpus as ``num_shards`` JSON Lines shards under ``corpus/`` (contiguous, sizes within one); queries,
    fine-tuning rows and fine-tuning queries as ``queries.jsonl``, ``finetune.jsonl`` and
    ``finetune_queries.jsonl``."""
    corpus_dir = directory / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    size, extra = divmod(len(data.corpus), num_shards)
    start = 0
    for index in range(num_shards):
        end = start + size + (index < extra)
        _write_jsonl(corpus_dir / f"shard-{index:04d}.jsonl", data.corpus[start:end])
        start = end
    _write_jsonl(directory / "queries.jsonl", data.queries)
    _write_jsonl(directory / "finetune.jsonl", data.finetune)
    _write_jsonl(directory / "finetune_queries.jsonl", data.finetune_queries)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
