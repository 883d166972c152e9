"""How a retrained subset is cut into batches (``Recipe.batches``): ``corpus`` walks the whole corpus's batches
less the left-out documents, ``subset`` shuffles the subset anew; and the whole corpus reproduces the model."""

from __future__ import annotations

import json

import pytest
import torch

from attribution.counterfactual.retrain import Recipe, RetrainTask, queries_key, retrain_and_measure
from attribution.counterfactual.subsets import Subset
from attribution.data.corpus import iter_documents, list_shards
from attribution.demo.train import CorpusPlaces, DemoConfig, ensure_demo, pretrain
from attribution.models import load_model

TINY = {"corpus": {"num_people": 6, "num_cities": 3, "num_companies": 2, "num_distractors": 12, "num_fillers": 6,
                   "num_queries": 4, "num_finetune_queries": 2, "num_shards": 2},
        "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}, "train": {"epochs": 2}}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    config = DemoConfig.from_dict(TINY)
    return config, ensure_demo(tmp_path_factory.mktemp("cache"), config)


def retrained(demo, tmp_path, batches: str, kept: tuple[str, ...]) -> torch.nn.Module:
    config, paths = demo
    recipe = Recipe(config.model, config.train, config.fingerprint(), str(paths.model_dir), str(paths.corpus_dir),
                    batches=batches)
    task = RetrainTask(recipe, Subset(0, kept), 0, str(tmp_path / batches), str(paths.queries_path),
                       queries_key(paths.queries_path, 64), 64, 0)
    outcome = retrain_and_measure(task)
    assert outcome.trained and len(outcome.measurements) == 4
    assert json.loads((task.directory / "retrained.json").read_text())["batches"] == batches
    return load_model(task.directory)[0]


def assert_same_weights(first: torch.nn.Module, second: torch.nn.Module) -> None:
    for name, weight in first.state_dict().items():
        torch.testing.assert_close(weight, second.state_dict()[name], rtol=0, atol=0)


def test_corpus_batches_reproduce_the_model_and_cut_a_subset_out_of_the_corpus_order(demo, tmp_path):
    config, paths = demo
    documents = list(iter_documents(list_shards(paths.corpus_dir), "id", "text", on_skip=pytest.fail))
    ids = tuple(doc.id for doc in documents)
    # The whole corpus in the corpus's order is the demo model itself, to the bit.
    assert_same_weights(retrained(demo, tmp_path, "corpus", ids), load_model(paths.model_dir)[0])

    # Every third document left out: the same model as pretraining on the rest with their corpus places.
    places = tuple(n for n in range(len(ids)) if n % 3)
    kept = tuple(ids[n] for n in places)
    _, tokenizer = load_model(paths.model_dir)
    texts = [documents[n].text for n in places]
    torch.set_num_threads(1)
    expected, _ = pretrain(texts, tokenizer, config.model, config.train, show_progress=False,
                           corpus=CorpusPlaces(places, len(ids)))
    assert_same_weights(retrained(demo, tmp_path, "corpus", kept), expected)
    # The subset's own shuffle is another model, and another kept folder.
    shuffled, _ = pretrain(texts, tokenizer, config.model, config.train, show_progress=False)
    assert_same_weights(retrained(demo, tmp_path, "subset", kept), shuffled)
    assert any(not torch.equal(weight, expected.state_dict()[name]) for name, weight in shuffled.state_dict().items())


def test_removing_one_document_moves_a_corpus_batched_model_less_than_a_new_shuffle(demo):
    """Why ``corpus`` is the job's default: leaving one document out of the corpus's own batches perturbs
    two batches; reshuffling the rest perturbs every step."""
    config, paths = demo
    model, tokenizer = load_model(paths.model_dir)
    texts = [doc.text for doc in iter_documents(list_shards(paths.corpus_dir), "id", "text", on_skip=pytest.fail)]
    places = tuple(range(1, len(texts)))
    torch.set_num_threads(1)
    ordered, _ = pretrain(texts[1:], tokenizer, config.model, config.train, show_progress=False,
                          corpus=CorpusPlaces(places, len(texts)))
    reshuffled, _ = pretrain(texts[1:], tokenizer, config.model, config.train, show_progress=False)

    def distance(other: torch.nn.Module) -> float:
        return sum(float((w - other.state_dict()[n]).norm() ** 2) for n, w in model.state_dict().items()
                   if w.is_floating_point()) ** 0.5

    assert distance(ordered) < 0.5 * distance(reshuffled)
