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
        if self.max_documents is not None and self.max_documents < 2:
            raise ValueError("natural_text.corpus.max_documents: expected at least 2 or null (every passage)")


@dataclass(frozen=True)
class NaturalTextData:
    """The training corpus (``id``, ``text`` rows) and the held-out queries (``id``, ``prompt``, ``completion``)."""

    corpus: list[dict]
    queries: list[dict]


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
    """Held-out queries and the training corpus, deterministic for the passages and ``config.seed``."""
    order = sorted(passages)
    random.Random(config.seed).shuffle(order)
    queries, corpus = [], []
    for text in order:
        words = text.split()
        if len(queries) < config.num_queries and len(words) >= config.min_prompt_words + config.completion_words:
            cut = len(words) - config.completion_words
            queries.append({"id": f"q-{len(queries) + 1:04d}", "prompt": " ".join(words[:cut]),
                            "completion": " " + " ".join(words[cut:])})
        elif config.max_documents is None or len(corpus) < config.max_documents:
            corpus.append({"id": f"doc-{len(corpus):05d}", "text": text})
    if len(queries) < config.num_queries or len(corpus) < 2:
        raise SettingsError(f"natural_text.corpus: {len(passages)} passages give {len(queries)} of {config.num_queries} queries "
                         f"and {len(corpus)} documents; lower num_queries or widen min_words/max_words")
    return NaturalTextData(corpus, queries)


def natural_text(config: NaturalTextCorpusConfig) -> NaturalTextData:
    """Read, clean and split the package's passages."""
    return split(clean(read_passages(config.source), config), config)


def write_natural_text(data: NaturalTextData, corpus_dir: Path, queries_path: Path, num_shards: int) -> None:
    """Corpus as ``num_shards`` JSON Lines shards (contiguous, sizes within one), queries as one JSON Lines file."""
    corpus_dir.mkdir(parents=True, exist_ok=True)
    size, extra = divmod(len(data.corpus), num_shards)
    start = 0
    for index in range(num_shards):
        end = start + size + (index < extra)
        _write_jsonl(corpus_dir / f"shard-{index:04d}.jsonl", data.corpus[start:end])
        start = end
    _write_jsonl(queries_path, data.queries)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
