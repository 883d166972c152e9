"""Tests for the demo tokenizer, config and the cached, atomic demo build."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from attribution.demo import train
from attribution.demo.corpus import DemoCorpusConfig, generate_demo
from attribution.demo.train import DemoConfig, DemoModelConfig, DemoTrainConfig, build_tokenizer, ensure_demo

YAML = Path(__file__).resolve().parents[2] / "conf" / "demo" / "default.yaml"


def tiny_config(seed: int = 0) -> DemoConfig:
    """A demo small enough to build in about a second."""
    return DemoConfig(
        corpus=DemoCorpusConfig(seed=seed, num_people=4, num_cities=3, num_companies=2,
                                num_distractors=4, num_fillers=4, num_queries=3,
                                num_finetune_queries=2, num_shards=2),
        model=DemoModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
        train=DemoTrainConfig(epochs=1, batch_size=8),
    )


@pytest.fixture(scope="module")
def data():
    return generate_demo(DemoCorpusConfig())


@pytest.fixture(scope="module")
def tokenizer(data):
    texts = [row["text"] for row in data.corpus]
    for row in data.finetune + data.queries + data.finetune_queries:
        texts += [row["prompt"], row["completion"]]
    return build_tokenizer(texts)


def test_prompt_and_completion_tokenize_like_their_concatenation(tokenizer, data):
    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for row in data.queries + data.finetune_queries + data.finetune:
        assert encode(row["prompt"]) + encode(row["completion"]) == encode(row["prompt"] + row["completion"])
        assert encode(row["completion"]) == encode(row["completion"].strip())
        assert len(encode(row["completion"])) == 1


def test_tokenizer_covers_corpus_and_round_trips_through_disk(tokenizer, data, tmp_path):
    ids = tokenizer([row["text"] for row in data.corpus], add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in {i for seq in ids for i in seq}
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert (loaded.pad_token, loaded.eos_token, loaded.unk_token) == ("<pad>", "<eos>", "<unk>")
    text = data.queries[0]["prompt"] + data.queries[0]["completion"]
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_yaml_mirrors_dataclass_defaults():
    assert DemoConfig.from_dict(yaml.safe_load(YAML.read_text())) == DemoConfig()


def test_from_dict_keeps_defaults_and_rejects_unknown_keys():
    config = DemoConfig.from_dict({"train": {"epochs": 2}})
    assert config.train.epochs == 2 and config.model == DemoModelConfig()
    with pytest.raises(ValueError, match="epoch"):
        DemoConfig.from_dict({"train": {"epoch": 2}})
    with pytest.raises(ValueError, match="optimizer"):
        DemoConfig.from_dict({"optimizer": {}})


def test_batches_mask_padding_out_of_the_loss():
    generator = torch.Generator().manual_seed(0)
    (batch,) = train._batches([[5, 6, 2], [7, 2]], 2, 0, generator, train.CorpusPlaces((0, 1), 2))
    assert batch["attention_mask"].sum() == 5
    assert (batch["labels"] == -100).sum() == 1
    assert (batch["labels"][batch["attention_mask"] == 1] != -100).all()


def test_a_part_of_the_corpus_walks_the_corpus_batches_less_its_missing_documents():
    """Each text is a one-token sequence naming its corpus place, so a batch's first column lists its places."""
    sequences = [[place] for place in range(10)]

    def epoch(places: tuple[int, ...]) -> list[list[int] | None]:
        generator = torch.Generator().manual_seed(3)
        chosen = [sequences[p] for p in places]
        return [None if batch is None else batch["input_ids"][:, 0].tolist()
                for batch in train._batches(chosen, 3, 99, generator, train.CorpusPlaces(places, 10))]

    full = epoch(tuple(range(10)))
    part = epoch((0, 2, 3, 5, 6, 7, 9))
    assert sorted(sum(full, [])) == list(range(10)) and len(full) == len(part) == 4
    assert part == [[p for p in batch if p in (0, 2, 3, 5, 6, 7, 9)] or None for batch in full]
    generator = torch.Generator().manual_seed(3)
    assert [len(b["input_ids"]) for b in train._batches(sequences[:7], 3, 99, generator,
                                                        train.CorpusPlaces(tuple(range(7)), 7))] == [3, 3, 1]
    with pytest.raises(ValueError, match="distinct"):
        train.CorpusPlaces((1, 1), 10)
    with pytest.raises(ValueError, match="2 texts but 3 corpus positions"):
        train.pretrain(["a b", "c d"], build_tokenizer(["a b", "c d"]), DemoModelConfig(hidden_size=8, num_layers=1,
                       num_heads=2, intermediate_size=8), DemoTrainConfig(epochs=1), show_progress=False,
                       corpus=train.CorpusPlaces((0, 1, 2), 5))


def test_ensure_demo_builds_loadable_files(tmp_path):
    paths = ensure_demo(tmp_path, tiny_config())
    assert paths.root.parent == tmp_path
    assert len(list(paths.corpus_dir.glob("shard-*.parquet"))) == 2
    for path in (paths.queries_path, paths.finetune_path, paths.finetune_queries_path,
                 paths.summary_path):
        assert path.is_file()
    assert not list(paths.model_dir.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(paths.model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(paths.model_dir, local_files_only=True)
    assert model.config.vocab_size == len(tokenizer)
    assert [p.name for p in tmp_path.iterdir()] == [paths.root.name]


def test_ensure_demo_reuses_the_cache_and_rebuilds_for_a_new_config(tmp_path, monkeypatch):
    first = ensure_demo(tmp_path, tiny_config())

    def no_training(*args, **kwargs):
        raise AssertionError("retrained a cached demo")

    monkeypatch.setattr(train, "pretrain", no_training)
    assert ensure_demo(tmp_path, tiny_config()) == first
    monkeypatch.undo()
    other = ensure_demo(tmp_path, tiny_config(seed=1))
    assert other.root != first.root and other.root.is_dir()


def test_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(train, "pretrain", crash)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_demo(tmp_path, tiny_config())
    assert list(tmp_path.iterdir()) == []


def test_losing_a_build_race_uses_the_winners_demo(tmp_path, monkeypatch):
    config = tiny_config()
    final = tmp_path / f"v{train.DEMO_VERSION}-{config.fingerprint()}"
    real_build = train.build_demo

    def build_while_another_process_finishes(directory, config):
        real_build(directory, config)
        shutil.copytree(directory, final)
        (final / "winner").touch()

    monkeypatch.setattr(train, "build_demo", build_while_another_process_finishes)
    paths = ensure_demo(tmp_path, config)
    assert paths.root == final and (final / "winner").exists()
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_default_cache_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_CACHE", str(tmp_path))
    assert train.default_cache_root() == tmp_path / "demo"
    monkeypatch.delenv("ATTRIBUTION_CACHE")
    assert train.default_cache_root() == Path.home() / ".cache" / "attribution" / "demo"
