"""NaN and Inf in a fit stop it with one line naming the parameter or module, and no store is written."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from attribution.curvature.accumulators import CovarianceSums, EigenvalueSums
from attribution.curvature.finite import NonFiniteError, check_covariance_sums, check_eigenvalue_sums
from attribution.curvature.fit import Collective, FitConfig, SingleProcess, fit_factors
from attribution.curvature.store import save_factors
from attribution.errors import UserError, user_error_of
from attribution.fitting import run_fit
from attribution.models import find_tracked_modules
from attribution.settings import ClusterSettings, DataSettings, FactorSettings, ModelSettings
from tests.jobs.helpers import overrides, run_job, tiny_inputs
from tests.scoring.test_run import corpus_rows, write_shards
from tests.tiny import make_batch, random_sequences, save_tiny_lm, tiny_model

BROKEN = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
# A token id that random_sequences(6, seed=3) never draws: the sequences holding it are chosen here.
HUGE_TOKEN = 36
FISHERS = ["true", "empirical"]


def sequences_with_huge_token(at: int) -> list[list[int]]:
    sequences = random_sequences(6, seed=3)
    assert all(HUGE_TOKEN not in s for s in sequences)
    sequences[at] = [1, 2, HUGE_TOKEN, 3]
    return sequences


def fit(model, fisher, sequences, batch_size=2, collective: Collective = SingleProcess(), ids=None):
    tracked = find_tracked_modules(model)
    ids = ids or [f"doc-{i}" for i in range(len(sequences))]

    def batches():
        for start in range(0, len(sequences), batch_size):
            yield make_batch(sequences[start:start + batch_size], ids[start:start + batch_size])

    config = FitConfig(fisher=fisher, dtype=torch.float32, progress=False)
    return fit_factors(model, tracked, batches, config, "test", {}, collective)


def with_nan_weight(model):
    """Three NaNs in one weight, as a broken checkpoint has them."""
    with torch.no_grad():
        model.get_parameter(BROKEN).view(-1)[:3] = float("nan")
    return model


def with_huge_embedding(model, token=HUGE_TOKEN):
    """A finite embedding row whose squares overflow float32 in the first layer norm: the
    sequences holding that token go NaN at run time, the others stay finite."""
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = 1e20
    return model


@pytest.fixture(scope="module")
def broken_inputs(tmp_path_factory):
    """The jobs' tiny model, corpus and queries, with NaNs in one weight of the saved model."""
    inputs = tiny_inputs(tmp_path_factory.mktemp("broken"))
    model = AutoModelForCausalLM.from_pretrained(inputs["model.path"])
    with_nan_weight(model).save_pretrained(inputs["model.path"])
    return inputs


def weight_line(model_path: str) -> str:
    return (f"model.path={model_path}: parameter {BROKEN} has 3 non-finite values (NaN or Inf) of 128; "
            "every sequence would give NaN factors, so nothing was fitted")


@pytest.mark.parametrize("fisher", FISHERS)
def test_a_nan_weight_stops_the_fit_naming_the_parameter_and_writes_no_store(broken_inputs, tmp_path, fisher):
    model = ModelSettings(path=broken_inputs["model.path"], device="cpu")
    data = DataSettings(path=broken_inputs["data.path"], max_length=16)
    with pytest.raises(NonFiniteError) as raised:
        run_fit(model, data, FactorSettings(fisher=fisher), tmp_path, {}, progress=False)
    assert str(raised.value) == weight_line(broken_inputs["model.path"])
    assert isinstance(raised.value, UserError)
    assert not (tmp_path / "factors").exists()


@pytest.mark.parametrize("fisher", FISHERS)
def test_in_the_passes_a_nan_weight_is_named_by_the_module_it_feeds(fisher):
    """Without the weight check (a caller of fit_factors): no multinomial error, no NaN factors."""
    with pytest.raises(NonFiniteError, match=r"^the activations entering module gpt_neox\.layers\.0\.mlp\.dense_4h_to_h "
                                             r"are NaN or Inf .* in the covariance pass \(first in the batch of "
                                             r"sequences doc-0, doc-1\); the fault is in what feeds that module$"):
        fit(with_nan_weight(tiny_model(dtype=torch.float32)), fisher, random_sequences(6, seed=3))


@pytest.mark.parametrize("fisher", FISHERS)
def test_an_overflow_at_run_time_names_the_module_and_the_batch(fisher):
    model = with_huge_embedding(tiny_model(dtype=torch.float32))
    with pytest.raises(NonFiniteError) as raised:
        fit(model, fisher, sequences_with_huge_token(at=3))
    assert str(raised.value).startswith("the activations entering module gpt_neox.layers.0.attention.query_key_value "
                                        "are NaN or Inf (or overflow float32 in their covariance) in the covariance pass "
                                        "(first in the batch of sequences doc-2, doc-3)")


@pytest.mark.parametrize("fisher", FISHERS)
def test_a_huge_weight_deep_in_the_model_names_the_module_it_overflows_into(fisher):
    model = tiny_model(dtype=torch.float32)
    with torch.no_grad():
        model.get_parameter("gpt_neox.layers.1.mlp.dense_h_to_4h.weight").mul_(1e25)
    with pytest.raises(NonFiniteError, match=r"^the activations entering module gpt_neox\.layers\.1\.mlp\.dense_4h_to_h "):
        fit(model, fisher, random_sequences(6, seed=3))


@pytest.mark.parametrize("fisher", FISHERS)
def test_nan_logits_after_the_last_tracked_module_name_it_and_the_loss(fisher):
    model = tiny_model(dtype=torch.float32)
    with torch.no_grad():
        model.get_parameter("gpt_neox.final_layer_norm.weight")[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"^the output gradients of module gpt_neox\.layers\.1\.mlp\.dense_4h_to_h are NaN "
                                             r"or Inf .*: the fault is between its output and the loss \(NaN or Inf logits\)$"):
        fit(model, fisher, random_sequences(6, seed=3))


def test_a_backward_fault_is_placed_between_two_modules():
    model = tiny_model(dtype=torch.float32)
    tracked = find_tracked_modules(model)
    sums = CovarianceSums(tracked, torch.float32, "cpu")
    for module in tracked[:3]:
        sums.gradient[module.name][0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=rf"^the output gradients of module {tracked[2].name} are NaN or Inf in the "
                                             rf"covariance pass, with finite activations: the fault is between its output "
                                             rf"and the input of module {tracked[3].name}$"):
        check_covariance_sums(sums, None)


def test_overflowing_eigenvalue_sums_name_the_module_and_the_dtype_that_holds_them():
    tracked = find_tracked_modules(tiny_model(dtype=torch.float32))
    eye = {m.name: torch.eye(m.d_in_augmented) for m in tracked}
    sums = EigenvalueSums(tracked, eye, {m.name: torch.eye(m.d_out) for m in tracked})
    sums.squares[tracked[5].name][1, 2] = float("inf")
    assert not sums.all_finite()
    with pytest.raises(NonFiniteError, match=rf"^the squared per-sequence gradients of module {tracked[5].name} overflow "
                                             r"float32 in the eigenvalue pass \(first in the batch of sequences a, b, c "
                                             r"and 1 more\); factors.dtype=float64 holds larger ones$"):
        check_eigenvalue_sums(sums, ["a", "b", "c", "d"])


def test_a_store_with_a_nonfinite_factor_is_not_written_and_the_old_one_is_kept(tmp_path):
    fitted = fit(tiny_model(dtype=torch.float32), "true", random_sequences(6, seed=3))
    store = save_factors(fitted, tmp_path / "factors")
    before = {path.name: path.read_bytes() for path in store.iterdir()}
    name = fitted.manifest.modules[2].name
    broken = copy.deepcopy(fitted)
    broken.modules[name].corrected_eigenvalues[0, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=rf"^factor store {store} not written: module {name}: corrected_eigenvalues "
                                             r"has 1 non-finite values \(NaN or Inf\)$"):
        save_factors(broken, store)
    assert {path.name: path.read_bytes() for path in store.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["factors"]


class ThreadCollective:
    """Workers in threads of this process: ``all_reduce`` sums through a barrier, whose timeout
    turns a worker left waiting for another into a test failure instead of a hang."""

    def __init__(self, rank: int, parts: list, barrier: threading.Barrier) -> None:
        self.rank, self.world_size, self.parts, self.barrier = rank, len(parts), parts, barrier

    def all_reduce(self, tensors: list[torch.Tensor]) -> None:
        self.parts[self.rank] = [tensor.clone() for tensor in tensors]
        self.barrier.wait()
        for index, tensor in enumerate(tensors):
            tensor.copy_(sum(part[index] for part in self.parts))
        self.barrier.wait()


@pytest.mark.parametrize("fisher", FISHERS)
def test_an_overflow_on_one_worker_stops_every_worker_with_the_same_module(fisher):
    model = with_huge_embedding(tiny_model(dtype=torch.float32))
    sequences = sequences_with_huge_token(at=3)
    ids = [f"doc-{i}" for i in range(len(sequences))]
    parts: list = [None, None]
    barrier = threading.Barrier(2, timeout=60)
    errors: list[BaseException | None] = [None, None]

    def worker(rank: int) -> None:
        # Item i goes to worker i mod 2, as in training_batches: doc-3 is worker 1's alone.
        try:
            fit(copy.deepcopy(model), fisher, sequences[rank::2], ids=ids[rank::2], collective=ThreadCollective(rank, parts, barrier))
        except BaseException as error:  # noqa: BLE001 - the test inspects whatever each worker raised
            errors[rank] = error

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(error, NonFiniteError) for error in errors), errors
    module = "the activations entering module gpt_neox.layers.0.attention.query_key_value are NaN or Inf"
    assert all(str(error).startswith(module) for error in errors)
    assert "doc-3" in str(errors[1]) and "first in the batch" not in str(errors[0])


# test_an_overflow_on_one_worker_stops_every_worker_with_the_same_module covers the logic; on Ray: slow suite.
@pytest.mark.slow
def test_an_overflow_on_one_ray_worker_is_a_user_error_and_writes_no_store(tmp_path):
    rows = corpus_rows(6)
    rows[3]["text"] += " zebra"  # in worker 1's share alone: worker w takes rows w, w + 2, ...
    model_dir = save_tiny_lm(tmp_path / "model", [r["text"] for r in rows])
    zebra = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("zebra")
    with_huge_embedding(AutoModelForCausalLM.from_pretrained(model_dir), zebra).save_pretrained(model_dir)
    model = ModelSettings(path=str(model_dir), device="cpu")
    data = DataSettings(path=write_shards(tmp_path / "corpus", [rows]), batch_size=2, max_length=32)
    with pytest.raises(UserError) as raised:
        run_fit(model, data, FactorSettings(path=str(tmp_path / "factors")), tmp_path / "out", {}, progress=False,
                cluster=ClusterSettings(num_workers=2))
    error = user_error_of(raised.value)
    assert isinstance(error, NonFiniteError)
    assert str(error).startswith("the activations entering module gpt_neox.layers.0.attention.query_key_value are NaN or Inf")
    assert not (tmp_path / "factors").exists()


def test_the_job_exits_2_with_one_line_naming_the_parameter(broken_inputs, tmp_path):
    result, _ = run_job("fit_factors", *overrides(broken_inputs, f"output_dir={tmp_path}", job="fit_factors"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"ERROR: {weight_line(broken_inputs['model.path'])}"
    assert not (tmp_path / "factors").exists()
