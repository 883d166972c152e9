"""Tests for the synthetic demo corpus: ground truth, determinism, files on disk."""

import json
import re

import pyarrow.parquet as pq
import pytest

from attribution.demo.corpus import DemoCorpusConfig, generate_demo, write_demo

NAME = re.compile(r"\b([A-Z][a-z]+ [A-Z][a-z]+)\b")


@pytest.fixture(scope="module")
def data():
    return generate_demo(DemoCorpusConfig())


@pytest.fixture(scope="module")
def every_fact():
    """Queries on every fact: asking for more queries than facts returns all of them."""
    return generate_demo(DemoCorpusConfig(num_queries=10_000, num_finetune_queries=10_000))


def test_same_seed_same_data_other_seed_other_data():
    assert generate_demo(DemoCorpusConfig(seed=3)) == generate_demo(DemoCorpusConfig(seed=3))
    assert generate_demo(DemoCorpusConfig(seed=3)).corpus != generate_demo(DemoCorpusConfig(seed=4)).corpus


def test_default_sizes(data):
    config = DemoCorpusConfig()
    assert 700 <= len(data.corpus) <= 1000
    assert len(data.queries) == config.num_queries
    assert len(data.finetune_queries) == config.num_finetune_queries
    assert data.finetune


def test_ids_unique(data):
    for rows in (data.corpus, data.finetune, data.queries + data.finetune_queries):
        ids = [row["id"] for row in rows]
        assert len(ids) == len(set(ids))


def test_documents_have_the_configured_length(data):
    config = DemoCorpusConfig()
    lengths = [len(row["text"].split()) for row in data.corpus]
    assert config.min_words <= min(lengths) and max(lengths) <= config.max_words


def test_sources_exist_and_state_the_fact(every_fact):
    texts = {row["id"]: row["text"] for row in every_fact.corpus}
    for query in every_fact.queries + every_fact.finetune_queries:
        name = NAME.search(query["prompt"]).group(1)
        assert query["completion"].startswith(" ")
        for doc_id in query["source_ids"]:
            assert name in texts[doc_id]
            assert query["completion"].strip() in texts[doc_id]


def test_every_fact_has_two_or_three_documents(every_fact):
    assert every_fact.queries
    assert all(2 <= len(q["source_ids"]) <= 3 for q in every_fact.queries)


def test_cloze_sentence_appears_in_exactly_one_source_and_no_other_document(every_fact):
    for query in every_fact.queries:
        sentence = query["prompt"] + query["completion"] + "."
        holders = [row["id"] for row in every_fact.corpus if sentence in row["text"]]
        assert len(holders) == 1 and holders[0] in query["source_ids"]


def test_finetune_queries_ask_about_people_left_out_of_finetuning(every_fact):
    tuned = {NAME.search(row["prompt"]).group(1) for row in every_fact.finetune}
    asked = {NAME.search(row["prompt"]).group(1) for row in every_fact.finetune_queries}
    assert tuned and asked and not tuned & asked
    assert all(row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:")
               for row in every_fact.finetune + every_fact.finetune_queries)


def test_write_demo_files(tmp_path, data):
    write_demo(data, tmp_path, num_shards=3)
    shards = sorted((tmp_path / "corpus").glob("*.parquet"))
    assert [p.name for p in shards] == [f"shard-{i:04d}.parquet" for i in range(3)]
    rows = [row for path in shards for row in pq.read_table(path).to_pylist()]
    assert rows == data.corpus
    for name, expected in (("finetune.jsonl", data.finetune), ("queries.jsonl", data.queries),
                           ("finetune_queries.jsonl", data.finetune_queries)):
        lines = (tmp_path / name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == expected


def test_impossible_config_is_rejected():
    with pytest.raises(ValueError):
        generate_demo(DemoCorpusConfig(max_docs_per_fact=5))
