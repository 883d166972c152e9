"""The natural-text benchmark's corpus: reading the fortunes files, cleaning, the split, and the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attribution.counterfactual.benchmarks import NaturalTextConfig, build_tokenizer
from attribution.counterfactual.natural_text import (
    DEFAULT_SOURCE,
    FINETUNE_PROMPT,
    MissingPackageError,
    NaturalTextCorpusConfig,
    clean,
    natural_text,
    read_passages,
    split,
    write_natural_text,
)
from attribution.data.corpus import iter_documents, list_shards
from attribution.data.queries import read_queries
from attribution.settings import SettingsError
from tests.jobs.helpers import run_job

PROSE = [f"Passage number {n} tells of a quiet town where the river bends twice before the sea, and nobody hurries."
         for n in range(12)]


def fortunes_fixture(folder: Path) -> Path:
    """Two text files as the package lays them out (entries between % lines, wrapped, with attribution
    lines), a picture file, an index (.dat) and a .u8 link that must all be ignored or deduplicated."""
    folder.mkdir()
    wrapped = [text.replace(", and", ",\n\tand") + "\n\t\t-- Somebody Famous, \"A Book\"" for text in PROSE[:8]]
    (folder / "wisdom").write_text("\n%\n".join([*wrapped, "Too short to keep.", "x = y[0] + 1; // {} [] == ++ -- ** && ||",
                                                  PROSE[0].upper()]) + "\n%\n")
    (folder / "literature").write_text("\n%\n".join([*PROSE[8:], "caf\ufffd is not decodable " * 3]) + "\n")
    (folder / "ascii-art").write_text("\n%\n".join(PROSE) + "\n")
    (folder / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    (folder / "wisdom.u8").symlink_to(folder / "wisdom")
    return folder


def test_reader_cleans_deduplicates_and_splits_deterministically(tmp_path):
    source = fortunes_fixture(tmp_path / "fortunes")
    passages = read_passages(source)
    # File-name order, attribution lines cut, whitespace collapsed; the picture, index and link are not read.
    assert passages[:4] == [PROSE[8], PROSE[9], PROSE[10], PROSE[11]]
    assert PROSE[0] in passages and not any("Somebody" in p or "\n" in p or "\t" in p for p in passages)
    config = NaturalTextCorpusConfig(source=str(source), num_queries=3, completion_words=4, min_prompt_words=5,
                                     max_documents=None, num_shards=2, num_finetune=0)
    kept = clean(passages, config)
    # The short entry, the code, the undecodable one and the upper-case duplicate are gone.
    assert sorted(kept) == sorted(PROSE)
    data = split(kept, config)
    assert split(list(reversed(kept)), config) == data
    assert [q["id"] for q in data.queries] == ["q-0001", "q-0002", "q-0003"]
    for query in data.queries:
        assert query["prompt"] + query["completion"] in PROSE
        assert query["completion"].startswith(" ") and len(query["completion"].split()) == 4
    held_out = {q["prompt"] + q["completion"] for q in data.queries}
    assert {row["text"] for row in data.corpus} == set(PROSE) - held_out
    assert [row["id"] for row in data.corpus] == [f"doc-{n:05d}" for n in range(9)]
    assert split(kept, NaturalTextCorpusConfig(**{**config.__dict__, "seed": 1})) != data
    assert len(split(kept, NaturalTextCorpusConfig(**{**config.__dict__, "max_documents": 4})).corpus) == 4
    assert data.finetune == []

    # The fine-tuning rows come after the corpus, which does not change; queries and rows are framed.
    tuned = split(kept, NaturalTextCorpusConfig(**{**config.__dict__, "max_documents": 6, "num_finetune": 3}))
    assert tuned.queries == data.queries and tuned.corpus == data.corpus[:6]
    assert [row["id"] for row in tuned.finetune] == ["ft-00000", "ft-00001", "ft-00002"]
    rest = {row["text"] for row in data.corpus[6:]}
    for row in tuned.finetune:
        assert row["prompt"].startswith("Finish the passage: ") and row["prompt"].endswith(" =>")
        assert row["prompt"][len("Finish the passage: "):-len(" =>")] + row["completion"] in rest
    assert [(q["id"], q["prompt"], q["completion"]) for q in tuned.finetune_queries] == [
        (q["id"], FINETUNE_PROMPT.format(q["prompt"]), q["completion"]) for q in data.queries]
    with pytest.raises(SettingsError, match="0 of 3 fine-tuning rows; lower num_queries, max_documents or num_finetune"):
        split(kept, NaturalTextCorpusConfig(**{**config.__dict__, "num_finetune": 3}))

    # The project's corpus and query formats, read back by the project's readers.
    write_natural_text(tuned, tmp_path, config.num_shards)
    assert len(list_shards(tmp_path / "corpus")) == 2
    documents = list(iter_documents(list_shards(tmp_path / "corpus"), on_skip=pytest.fail))
    assert [(d.id, d.text) for d in documents] == [(r["id"], r["text"]) for r in tuned.corpus]
    assert [q.prompt for q in read_queries(tmp_path / "finetune.jsonl", on_skip=pytest.fail)] == [
        r["prompt"] for r in tuned.finetune]
    assert len(read_queries(tmp_path / "finetune_queries.jsonl", on_skip=pytest.fail)) == 3
    assert [q.id for q in read_queries(tmp_path / "queries.jsonl", on_skip=pytest.fail)] == ["q-0001", "q-0002", "q-0003"]
    assert json.loads((tmp_path / "queries.jsonl").read_text().splitlines()[0]) == data.queries[0]


def test_too_few_passages_and_bad_config_say_what_to_change(tmp_path):
    source = fortunes_fixture(tmp_path / "fortunes")
    with pytest.raises(ValueError, match="lower num_queries"):
        natural_text(NaturalTextCorpusConfig(source=str(source), num_queries=20, min_prompt_words=5))
    with pytest.raises(SettingsError, match="natural_text.corpus: need 1 <= min_words"):
        NaturalTextConfig.from_dict({"corpus": {"min_words": 50, "max_words": 10}})
    with pytest.raises(SettingsError, match="unknown key.*natural_text.model: hidden"):
        NaturalTextConfig.from_dict({"model": {"hidden": 8}})
    with pytest.raises(SettingsError, match="natural_text.vocab_size"):
        NaturalTextConfig.from_dict({"vocab_size": 10})


def test_missing_package_is_one_line_naming_the_install_command(tmp_path):
    with pytest.raises(MissingPackageError, match="apt-get install -y fortunes"):
        read_passages(tmp_path / "nowhere")
    result, _ = run_job("validate_counterfactual", "benchmark=natural_text", f"natural_text.corpus.source={tmp_path / 'nowhere'}",
                        f"output_dir={tmp_path / 'out'}", env={"ATTRIBUTION_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "apt-get install -y fortunes" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_byte_level_tokenizer_splits_prompt_and_completion_as_the_joined_text():
    tokenizer = build_tokenizer(PROSE * 4, vocab_size=300)
    prompt, completion = "Passage number 3 tells of a quiet", " town where the river bends"
    separate = [*tokenizer(prompt, add_special_tokens=False)["input_ids"],
                *tokenizer(completion, add_special_tokens=False)["input_ids"]]
    assert separate == tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    # No unknown token: unseen characters are bytes.
    assert tokenizer.decode(tokenizer("Ünïcode ✓", add_special_tokens=False)["input_ids"]) == "Ünïcode ✓"


@pytest.mark.skipif(not Path(DEFAULT_SOURCE).is_dir(), reason="Debian's fortunes is not installed (apt-get install -y fortunes)")
def test_the_installed_package_gives_thousands_of_prose_documents():
    # CI installs the package (.ci/run); the default config's corpus and queries.
    data = natural_text(NaturalTextCorpusConfig(source=DEFAULT_SOURCE))
    assert len(data.corpus) == 5000 and len(data.queries) == 32 and len(data.finetune) == 2000


TINY_NATURAL = {"corpus": {"num_queries": 2, "completion_words": 4, "min_prompt_words": 5, "max_documents": 8,
                           "num_shards": 2, "num_finetune": 2},
                "vocab_size": 300, "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
                "train": {"epochs": 2, "batch_size": 4}, "finetune": {"epochs": 3, "batch_size": 2}}


def test_the_fine_tuning_stage_is_the_recipe_on_the_framed_rows_and_the_queries_are_framed(tmp_path, monkeypatch):
    from attribution.counterfactual.benchmarks import prepare_benchmark
    from attribution.counterfactual.measure import measure_queries
    from attribution.demo.train import DemoFinetuneConfig, finetune
    from attribution.models import load_model

    monkeypatch.setenv("ATTRIBUTION_CACHE", str(tmp_path / "cache"))
    source = fortunes_fixture(tmp_path / "fortunes")
    config = {**TINY_NATURAL, "corpus": {**TINY_NATURAL["corpus"], "source": str(source)}}
    plain = prepare_benchmark("natural_text", {}, config)
    staged = prepare_benchmark("natural_text", {}, config, finetune=True)
    assert plain.finetune is None and staged.model_dir == plain.model_dir and staged.corpus_dir == plain.corpus_dir
    root = plain.model_dir.parent
    assert staged.queries_path == root / "finetune_queries.jsonl"
    assert (staged.finetune.model_dir, staged.finetune.rows_path) == (root / "finetuned", root / "finetune.jsonl")
    assert staged.recipe.finetune == DemoFinetuneConfig(epochs=3, batch_size=2)
    assert staged.recipe.finetune_rows == str(root / "finetune.jsonl")

    # The framed queries are the held-out queries in the frame; the rows are passages after the corpus.
    queries = read_queries(plain.queries_path, on_skip=pytest.fail)
    framed = read_queries(staged.queries_path, on_skip=pytest.fail)
    assert [(q.id, FINETUNE_PROMPT.format(q.prompt), q.completion) for q in queries] == [
        (q.id, q.prompt, q.completion) for q in framed]
    rows = [json.loads(line) for line in staged.finetune.rows_path.read_text().splitlines()]
    corpus = {doc.text for doc in iter_documents(list_shards(plain.corpus_dir), on_skip=pytest.fail)}
    assert len(rows) == 2 and all(row["prompt"].startswith("Finish the passage: ") for row in rows)
    assert not any(row["prompt"][len("Finish the passage: "):-len(" =>")] + row["completion"] in corpus for row in rows)

    # The kept fine-tuned model is the recipe applied to the pretrained model, and the summary's figures
    # are the framed queries measured on both.
    pretrained, tokenizer = load_model(plain.model_dir)
    again, _ = finetune(pretrained, tokenizer, rows, DemoFinetuneConfig(epochs=3, batch_size=2), show_progress=False)
    tuned, _ = load_model(staged.finetune.model_dir)
    for name, weight in tuned.state_dict().items():
        torch.testing.assert_close(weight, again.state_dict()[name], rtol=1e-5, atol=1e-6)
    summary = json.loads((root / "summary.json").read_text())
    for model, key in ((pretrained, "pretrained"), (tuned, "finetuned")):
        values = measure_queries(model, tokenizer, framed, 128, pytest.fail)
        assert summary[f"finetune_queries_log_prob_{key}"] == pytest.approx(sum(values.values()) / 2, abs=1e-6)
    assert summary["num_finetune_rows"] == 2
