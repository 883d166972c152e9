"""Factors from two Ray workers equal factors from one process."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from attribution.curvature.precondition import Preconditioner
from attribution.curvature.store import FactorSet, load_factors
from attribution.fitting import run_fit
from attribution.models import find_tracked_modules, load_model
from attribution.settings import ClusterSettings, DataSettings, FactorSettings, ModelSettings
from tests.scoring.test_run import corpus_rows, write_shards
from tests.tiny import save_tiny_lm

pytestmark = pytest.mark.filterwarnings("ignore")


# test_multinode's fit across two nodes checks the same equality in the suite; here both strategies: slow suite.
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_two_workers_equal_one_process(tmp_path, ray_local, strategy):
    rows = corpus_rows(11)
    model_dir = save_tiny_lm(tmp_path / "model", [r["text"] for r in rows])
    # Uneven shards: 7, 1 and 3 documents, with an empty text among them.
    corpus = write_shards(tmp_path / "corpus", [rows[:7], [{"id": "blank", "text": ""}], rows[7:]])
    model = ModelSettings(path=str(model_dir), device="cpu", dtype="float64")
    data = DataSettings(path=corpus, batch_size=3, max_length=16)
    factors = FactorSettings(strategy=strategy, dtype="float64")
    single = run_fit(model, data, replace(factors, path=str(tmp_path / "one")), tmp_path / "a", {}, progress=False)
    double = run_fit(model, data, replace(factors, path=str(tmp_path / "two")), tmp_path / "b", {},
                     progress=False, cluster=ClusterSettings(num_workers=2))
    assert (single.num_sequences, single.num_tokens, single.num_skipped) == (double.num_sequences, double.num_tokens, double.num_skipped)
    assert single.num_skipped == 1
    lm, _ = load_model(model_dir)
    tracked = find_tracked_modules(lm)
    one = load_factors(single.factors_path, tracked, None)
    two = load_factors(double.factors_path, tracked, None)
    assert_same_factors(one, two)
    assert two.manifest.data["workers"] == 2


def assert_same_factors(one: FactorSet, two: FactorSet) -> None:
    """The same covariances, and the same damped inverse: eigenvectors are defined up to sign (and
    rotation within a degenerate eigenspace), so what the factors imply is compared on a vector."""
    for name, left in one.modules.items():
        right = two.modules[name]
        for key in ("activation_covariance", "gradient_covariance"):
            torch.testing.assert_close(right.as_dict()[key], left.as_dict()[key], rtol=1e-9, atol=1e-12, msg=f"{name} {key}")
    generator = torch.Generator().manual_seed(0)
    for spec in one.manifest.modules:
        vector = torch.randn(spec.d_out, spec.d_in + spec.bias, generator=generator, dtype=torch.float64)
        expected = Preconditioner(one, damping=1e-3).apply(spec.name, vector)
        actual = Preconditioner(two, damping=1e-3).apply(spec.name, vector)
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max()))


def test_sharded_model_gives_the_same_factors(tmp_path, ray_local):
    """FSDP2 inside the workers: each holds half of every block's parameters, and the hooks
    still see full activations and output gradients."""
    rows = corpus_rows(7)
    model_dir = save_tiny_lm(tmp_path / "model", [r["text"] for r in rows])
    corpus = write_shards(tmp_path / "corpus", [rows[:5], rows[5:]])
    model = ModelSettings(path=str(model_dir), device="cpu", dtype="float64")
    # Worker 0 gets 4 documents (2 batches), worker 1 gets 3 (1 batch): every forward of a
    # sharded model gathers from both, so worker 1 must keep step without counting.
    data = DataSettings(path=corpus, batch_size=3, max_length=16)
    single = run_fit(model, data, FactorSettings(dtype="float64", path=str(tmp_path / "one")), tmp_path / "a", {}, progress=False)
    sharded = run_fit(model, data, FactorSettings(dtype="float64", path=str(tmp_path / "two")), tmp_path / "b", {},
                      progress=False, cluster=ClusterSettings(num_workers=2, sharding="fsdp"))
    lm, _ = load_model(model_dir)
    tracked = find_tracked_modules(lm)
    one = load_factors(single.factors_path, tracked, None)
    two = load_factors(sharded.factors_path, tracked, None)
    assert two.manifest.model_fingerprint == one.manifest.model_fingerprint
    held = [worker["parameters_held"] for worker in json.loads(sharded.run_record.read_text())["config"]["workers"]]
    total = sum(parameter.numel() for parameter in lm.parameters())
    assert sum(held) == total and max(held) < 0.6 * total, f"each worker should hold about half: {held} of {total}"
    for name, left in one.modules.items():
        torch.testing.assert_close(two.modules[name].activation_covariance, left.activation_covariance, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(two.modules[name].gradient_covariance, left.gradient_covariance, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(two.modules[name].corrected_eigenvalues.sort().values,
                                   left.corrected_eigenvalues.sort().values, rtol=1e-6, atol=1e-10)


def test_shard_model_shards_every_block():
    """One-process group: every parameter becomes a DTensor, and a model without declared
    blocks is refused by name."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from attribution.distributed.cluster import init_process_group, listening_socket
    from attribution.distributed.sharding import ShardingError, shard_model, transformer_blocks
    from tests.tiny import tiny_model

    listener = listening_socket("127.0.0.1")
    init_process_group(0, 1, "127.0.0.1", listener.getsockname()[1], listener, use_gpu=False)
    try:
        lm = tiny_model()
        assert len(transformer_blocks(lm)) == lm.config.num_hidden_layers
        shard_model(lm)
        assert all(isinstance(parameter, DTensor) for parameter in lm.parameters())
        undeclared = tiny_model()
        undeclared._no_split_modules = None
        with pytest.raises(ShardingError, match="declares no transformer block"):
            shard_model(undeclared)
    finally:
        dist.destroy_process_group()
