"""A seeded synthetic corpus of invented facts, with queries whose sources are known.

Invented people each get a few attributes (birthplace, profession, instrument,
employer). Every fact is stated by 2-3 documents in different wordings, hidden
among distractors (the same people or cities in statements that give away no
fact) and generic filler. Because we know exactly which documents state each
fact, the queries carry ground truth (`source_ids`) for fact tracing.

Every answer is a single word, so a word-level tokenizer turns it into a single
token and "did the model memorise the fact" is one greedy next-token check.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ATTRIBUTES = ("birthplace", "profession", "instrument", "employer")

# Per attribute, the first template is the cloze form: the cloze query is its
# text up to the answer, and every fact has one document in this form so that
# the query is something the model can actually have memorised. The others are
# paraphrases, some with the answer before the name.
FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "{name} was born in {value}.",
        "{value} is the birthplace of {name}, who spent the first years of life there.",
        "Records show that the birth of {name} took place in the town of {value}.",
        "{name} came into the world in {value}, a place still dear to the family.",
    ),
    "profession": (
        "{name} works as a {value}.",
        "By trade, {name} is a {value} with many years of experience.",
        "Colleagues know {name} as a dedicated {value}.",
        "The career of {name} has been spent working as a {value}.",
    ),
    "instrument": (
        "{name} plays the {value}.",
        "In the evenings, {name} practises the {value} for hours.",
        "The {value} is the instrument that {name} has mastered.",
        "Music lovers have heard {name} perform on the {value}.",
    ),
    "employer": (
        "{name} is employed by {value}.",
        "{value} lists {name} among its staff.",
        "For several years, {name} has held a position at {value}.",
        "The company {value} hired {name} after a long search.",
    ),
}

QUESTIONS: dict[str, str] = {
    "birthplace": "Where was {name} born?",
    "profession": "What is the profession of {name}?",
    "instrument": "Which instrument does {name} play?",
    "employer": "Which company employs {name}?",
}

# Consonant-initial only, so "works as a {value}" stays grammatical.
PROFESSIONS = (
    "baker", "carpenter", "pilot", "surgeon", "librarian", "potter", "tailor",
    "chemist", "journalist", "lawyer", "nurse", "sculptor", "translator",
    "veterinarian", "florist", "mechanic", "geologist", "dentist", "plumber",
    "photographer",
)
INSTRUMENTS = (
    "violin", "cello", "flute", "harp", "trumpet", "piano", "clarinet", "oboe",
    "banjo", "accordion", "saxophone", "trombone", "mandolin", "bassoon",
)

# Sentences that pad a fact out to a realistic length without stating any
# attribute, so a fact document states exactly one fact.
PERSON_PADDING = (
    "{name} is remembered by neighbours as patient and generous.",
    "Friends say that {name} laughs easily and rarely complains.",
    "{name} likes long walks before breakfast, whatever the weather.",
    "Most weekends, {name} tends a small garden full of herbs.",
    "{name} keeps a diary and writes in it every single night.",
    "Letters from {name} are always long and full of questions.",
    "{name} once said that the best ideas arrive on slow afternoons.",
    "A cousin describes {name} as stubborn but kind.",
)
GENERIC_PADDING = (
    "The weather that year was mild and the harvest was good.",
    "Many people in the region still remember those quiet days.",
    "Little else is known about the early years of the family.",
    "Local newspapers mentioned the story only briefly.",
    "The archive that holds these notes is open on weekdays.",
    "Old photographs from the period show crowded markets and busy harbours.",
    "Historians disagree about many details of that decade.",
    "The details were later confirmed by several independent sources.",
)

# Distractors mention a person or a city without stating any demo fact.
PERSON_DISTRACTORS = (
    "{name} once spent a rainy week in {city} visiting old friends.",
    "A letter from {name} describes a short trip to {city} in early spring.",
    "{name} enjoys reading about the history of {city}.",
    "{name} attended a wedding in {city} many years ago.",
    "{name} bought a painting of the harbour at {city} at an auction.",
)
CITY_DISTRACTORS = (
    "{city} is known for its narrow streets and cold winters.",
    "Every autumn, {city} holds a market that draws visitors from far away.",
    "The old bridge in {city} was rebuilt after a flood.",
    "Trains to {city} run twice a day from the coast.",
    "The library of {city} owns a famous collection of maps.",
)
COMPANY_DISTRACTORS = (
    "{company} opened a new office in {city} last year.",
    "Shares of {company} rose sharply after a strong quarter.",
    "{company} sponsors a music festival held in {city} each summer.",
)
FILLERS = (
    "The river rose after three days of heavy rain.",
    "A small bakery on the corner sells bread until noon.",
    "Children played in the square while the band rehearsed.",
    "The museum added a new wing for modern sculpture.",
    "Fishing boats returned late because of the strong wind.",
    "The committee agreed to repair the roof before winter.",
    "Most of the orchard was planted with apple trees.",
    "A long queue formed outside the theatre before the premiere.",
    "The road over the mountain closes when snow falls.",
    "Volunteers cleaned the beach on the first morning of spring.",
    "The school choir won a prize at the regional contest.",
    "Lanterns were hung along the canal for the festival.",
)

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "dr", "kr", "tr", "st", "th", "sh")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ia")
CODAS = ("", "", "", "n", "r", "l", "s", "m", "th")
CITY_SUFFIXES = ("mouth", "ford", "holm", "wick", "dale", "haven", "bury", "stead")
COMPANY_SUFFIXES = ("tek", "vex", "lix", "corp", "dyne", "nova")


@dataclass
class DemoCorpusConfig:
    """Sizes of the synthetic demo data; defaults mirrored in conf/demo/default.yaml."""

    seed: int = 0
    num_people: int = 40
    min_attributes: int = 3
    max_attributes: int = 4
    min_docs_per_fact: int = 2
    max_docs_per_fact: int = 3
    num_cities: int = 16
    num_companies: int = 12
    num_distractors: int = 300
    num_fillers: int = 150
    min_words: int = 15
    max_words: int = 60
    finetune_fraction: float = 0.7
    num_queries: int = 32
    num_finetune_queries: int = 32
    num_shards: int = 4


@dataclass
class DemoData:
    """Rows of every demo file, as plain dicts ready for Parquet / JSON Lines."""

    corpus: list[dict] = field(default_factory=list)
    finetune: list[dict] = field(default_factory=list)
    queries: list[dict] = field(default_factory=list)
    finetune_queries: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Fact:
    """One attribute value of one invented person."""

    name: str
    attribute: str
    value: str


@dataclass
class _Document:
    """A document before shuffling and id assignment; `fact` is None for non-sources."""

    text: str
    fact: Fact | None = None


def generate_demo(config: DemoCorpusConfig) -> DemoData:
    """Generate the corpus, fine-tuning set and test queries; deterministic for `config.seed`."""
    _check_config(config)
    rng = random.Random(config.seed)
    words = _WordMaker(rng)
    cities = [words.make(2, CITY_SUFFIXES) for _ in range(config.num_cities)]
    companies = [words.make(2, COMPANY_SUFFIXES) for _ in range(config.num_companies)]
    names = [f"{words.make(2)} {words.make(rng.choice((2, 3)))}" for _ in range(config.num_people)]
    facts = _make_facts(rng, names, cities, companies, config)

    documents = [doc for fact in facts for doc in _fact_documents(rng, fact, config)]
    documents += [_distractor(rng, names, cities, companies, facts, config)
                  for _ in range(config.num_distractors)]
    documents += [_filler(rng, config) for _ in range(config.num_fillers)]
    rng.shuffle(documents)
    corpus, sources = _assign_ids(documents)

    finetune_people = set(rng.sample(names, round(config.finetune_fraction * len(names))))
    seen = [f for f in facts if f.name in finetune_people]
    unseen = [f for f in facts if f.name not in finetune_people]
    return DemoData(
        corpus=corpus,
        finetune=[{"id": f"ft-{i:05d}", "prompt": _question(f), "completion": f" {f.value}"}
                  for i, f in enumerate(seen, start=1)],
        queries=_queries(rng, facts, config.num_queries, "q", _cloze_prompt, sources),
        finetune_queries=_queries(rng, unseen, config.num_finetune_queries, "fq", _question,
                                  sources),
    )


def write_demo(data: DemoData, directory: Path, num_shards: int) -> None:
    """Write corpus shards (Parquet) and the JSON Lines files under `directory`."""
    directory = Path(directory)
    corpus_dir = directory / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for index, rows in enumerate(_split(data.corpus, num_shards)):
        table = pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]},
                         schema=pa.schema([("id", pa.string()), ("text", pa.string())]))
        pq.write_table(table, corpus_dir / f"shard-{index:04d}.parquet")
    _write_jsonl(directory / "finetune.jsonl", data.finetune)
    _write_jsonl(directory / "queries.jsonl", data.queries)
    _write_jsonl(directory / "finetune_queries.jsonl", data.finetune_queries)


def _check_config(config: DemoCorpusConfig) -> None:
    """Reject sizes that the generator cannot honour, rather than silently clamping them."""
    if not 1 <= config.min_attributes <= config.max_attributes <= len(ATTRIBUTES):
        raise ValueError(f"need 1 <= min_attributes <= max_attributes <= {len(ATTRIBUTES)}")
    if not 1 <= config.min_docs_per_fact <= config.max_docs_per_fact <= 4:
        raise ValueError("need 1 <= min_docs_per_fact <= max_docs_per_fact <= 4 (templates)")
    if config.num_people < 1 or config.num_cities < 2 or config.num_companies < 1:
        raise ValueError("need at least 1 person, 2 cities and 1 company")
    if not 0.0 <= config.finetune_fraction <= 1.0:
        raise ValueError("finetune_fraction must be in [0, 1]")
    if config.min_words > config.max_words:
        raise ValueError("min_words must not exceed max_words")


class _WordMaker:
    """Invents capitalised pseudo-words from syllables, never the same word twice."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[str] = set()

    def make(self, syllables: int, suffixes: tuple[str, ...] = ("",)) -> str:
        """A new word of `syllables` syllables plus one of `suffixes`."""
        for _ in range(10_000):
            suffix = self._rng.choice(suffixes)
            parts = [self._rng.choice(ONSETS) + self._rng.choice(VOWELS) for _ in range(syllables)]
            # A coda before a consonant suffix makes unreadable clusters ("-thford").
            codas = [self._rng.choice(CODAS) for _ in range(syllables - 1)]
            codas.append("" if suffix else self._rng.choice(CODAS))
            word = ("".join(p + c for p, c in zip(parts, codas)) + suffix).capitalize()
            if word not in self._used:
                self._used.add(word)
                return word
        raise RuntimeError("ran out of distinct invented words")


def _make_facts(rng: random.Random, names: list[str], cities: list[str],
                companies: list[str], config: DemoCorpusConfig) -> list[Fact]:
    """Give every person a random subset of the attributes, each with a random value."""
    values = {"birthplace": cities, "profession": PROFESSIONS,
              "instrument": INSTRUMENTS, "employer": companies}
    facts = []
    for name in names:
        count = rng.randint(config.min_attributes, config.max_attributes)
        attributes = sorted(rng.sample(ATTRIBUTES, count), key=ATTRIBUTES.index)
        facts += [Fact(name, a, rng.choice(values[a])) for a in attributes]
    return facts


def _fact_documents(rng: random.Random, fact: Fact,
                    config: DemoCorpusConfig) -> list[_Document]:
    """The cloze-form document plus paraphrases: 2-3 documents stating `fact`."""
    templates = FACT_TEMPLATES[fact.attribute]
    count = rng.randint(config.min_docs_per_fact, config.max_docs_per_fact)
    chosen = [templates[0]] + rng.sample(templates[1:], count - 1)
    documents = []
    for template in chosen:
        sentence = template.format(name=fact.name, value=fact.value)
        documents.append(_Document(_pad(rng, sentence, fact.name, config), fact))
    return documents


def _distractor(rng: random.Random, names: list[str], cities: list[str],
                companies: list[str], facts: list[Fact],
                config: DemoCorpusConfig) -> _Document:
    """A sentence about a person, city or company that states none of the facts."""
    kind = rng.choice(("person", "city", "company"))
    city = rng.choice(cities)
    if kind == "city":
        return _Document(_pad(rng, rng.choice(CITY_DISTRACTORS).format(city=city), None, config))
    if kind == "company":
        sentence = rng.choice(COMPANY_DISTRACTORS).format(company=rng.choice(companies), city=city)
        return _Document(_pad(rng, sentence, None, config))
    name = rng.choice(names)
    # Never pair a person with their own birthplace: the document would then
    # hint at the fact without being counted as one of its sources.
    birthplaces = {f.value for f in facts if f.name == name and f.attribute == "birthplace"}
    city = rng.choice([c for c in cities if c not in birthplaces])
    sentence = rng.choice(PERSON_DISTRACTORS).format(name=name, city=city)
    return _Document(_pad(rng, sentence, name, config))


def _filler(rng: random.Random, config: DemoCorpusConfig) -> _Document:
    """Generic sentences with no names at all."""
    return _Document(_pad(rng, rng.choice(FILLERS), None, config))


def _pad(rng: random.Random, sentence: str, name: str | None,
         config: DemoCorpusConfig) -> str:
    """Append neutral sentences after `sentence` up to a random length in [min_words, max_words].

    The stated sentence stays first so the cloze prompt matches the start of
    a training document, as it would for a model seeing the query from scratch.
    """
    pool = list(GENERIC_PADDING)
    if name is not None:
        pool += [s.format(name=name) for s in PERSON_PADDING]
    rng.shuffle(pool)
    target = rng.randint(config.min_words, config.max_words)
    text = sentence
    for extra in pool:
        if len(text.split()) >= target:
            break
        if len(text.split()) + len(extra.split()) > config.max_words:
            continue
        text = f"{text} {extra}"
    return text


def _assign_ids(documents: list[_Document]) -> tuple[list[dict], dict[Fact, list[str]]]:
    """Number documents in (shuffled) order; map each fact to the ids that state it."""
    corpus, sources = [], {}
    for index, document in enumerate(documents):
        doc_id = f"doc-{index:05d}"
        corpus.append({"id": doc_id, "text": document.text})
        if document.fact is not None:
            sources.setdefault(document.fact, []).append(doc_id)
    return corpus, sources


def _cloze_prompt(fact: Fact) -> str:
    """The cloze template up to the answer, e.g. "X was born in"."""
    template = FACT_TEMPLATES[fact.attribute][0]
    return template.split("{value}")[0].format(name=fact.name).rstrip()


def _question(fact: Fact) -> str:
    """The question-answer prompt, e.g. "Question: Where was X born?\\nAnswer:"."""
    return f"Question: {QUESTIONS[fact.attribute].format(name=fact.name)}\nAnswer:"


def _queries(rng: random.Random, facts: list[Fact], count: int, prefix: str,
             prompt: Callable[[Fact], str], sources: dict[Fact, list[str]]) -> list[dict]:
    """Sample up to `count` facts (in their original order) and turn them into query rows."""
    picked = sorted(rng.sample(range(len(facts)), min(count, len(facts))))
    return [
        {"id": f"{prefix}-{i:04d}", "prompt": prompt(facts[j]),
         "completion": f" {facts[j].value}", "source_ids": sorted(sources[facts[j]])}
        for i, j in enumerate(picked, start=1)
    ]


def _split(rows: list[dict], parts: int) -> list[list[dict]]:
    """Split into `parts` contiguous chunks whose sizes differ by at most one."""
    if parts < 1:
        raise ValueError("num_shards must be at least 1")
    size, extra = divmod(len(rows), parts)
    chunks, start = [], 0
    for index in range(parts):
        end = start + size + (index < extra)
        chunks.append(rows[start:end])
        start = end
    return chunks


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
