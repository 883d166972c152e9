"""Peak memory and multiply-adds of every stage, as functions of the model's shapes and the settings.

Notation: weights ``W`` bytes; tracked modules ``m`` with input width ``i_m`` (bias column included)
and output width ``o_m``; ``f`` = 4 bytes (factors and accumulation, float32); batch ``B``, sequence
``T``; vocabulary ``V``; hidden width ``H``; ``L`` blocks; queries ``Q`` (``Q_b`` per query batch,
``T_q`` tokens each), rank ``r``; the output layer's chunk of ``C`` target positions.

What autograd keeps for the backward pass is measured, not guessed: one block's saved tensors on a
short probe at two lengths give bytes per token ``s_1`` and per token pair ``s_2`` (an attention
that materialises its score matrix), so activations are ``L (s_1 B T + s_2 B T^2)``. Everything
else is counted from the code:

- forward+backward ``F(B, T) = L (s_1 B T + s_2 B T^2) + s_1 B T`` (one block's gradients during the
  backward) ``+ 2 B T H f`` (the last hidden state's gradient, accumulated over chunks) ``+ k C V f``
  (a chunk's logits, their softmax and gradient; ``k`` = 5 with sampled labels, 4 with data labels)
  ``+ B T max_m (i_m + o_m) f`` where the capture's backward copies one module's inputs and output
  gradients (a bias column, or a dtype change); ``s_1`` counts the inputs the capture holds;
- covariance pass ``W + F + sum_m (i_m^2 + o_m^2) f + max_m B T (i_m + o_m) f`` (the masked copies);
- eigendecomposition ``W + 2 sum_m (i_m^2 + o_m^2) f + max_m 32 d_m^2`` (one float64 copy, LAPACK's
  result and its ``2 d^2`` workspace, ``d_m = max(i_m, o_m)``);
- eigenvalue pass ``W + F + 2 sum_m (i_m^2 + o_m^2) f + sum_m o_m i_m f + max_m (B T (2 i_m + o_m) + o_m i_m) f``;
- the query stage holds ``E = sum_m (i_m^2 + o_m^2 + o_m i_m) f`` (the eigen-form) and the query
  factors ``R = Q r sum_m (i_m + o_m) f``, plus ``F(Q_b, T_q)`` and ``2 rows o_m i_m f`` (one chunk of
  queries in the eigenbasis); the candidate pass lets ``E`` go and holds ``R``, the dense factors
  ``Q o_m i_m f`` of the modules scoring's plan gives the per-document contraction (within
  ``score.dense_factors_mib``), and the larger of ``R`` (the scorer's own layout of the factors,
  while it is built) and ``F(B, T)`` plus one module's contraction temporaries (``3 B T Q r f``
  low-rank, ``B o_m i_m f`` per-document); token scores ``B T Q f`` more;
- the refinement (CG on a sample of ``n`` sequences of ``T_r`` tokens in batches of ``B_r``, the first ``k``
  kept, ``c`` queries solved together through ``S`` stages, ``P = sum_m o_m i_m``) ``W + E + P f`` (the
  damping) ``+ (6 + S - 1) c P f`` (CG's vectors, :data:`SOLVER_VECTORS`) ``+ (k + B_r [n > k]) L (g_1 T_r +
  g_2 T_r^2)`` (the kept graphs and one rebuilt batch's; ``g_1, g_2`` probed like ``s_1, s_2`` on a cached
  linearisation) ``+ min(c, 8) (3 B_r L (g_1 T_r + g_2 T_r^2) + 3 C V f)`` (one product's traversal of a
  batch's graphs, :data:`PRODUCT_GRAPHS` measured, and its output-layer chunk).

Multiply-adds count the matrix products; time divides them by a throughput measured on the machine
(:func:`measured_throughput`), the eigendecompositions by their own (``c d^3``, ``c`` measured).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedModel

from attribution.curvature.capture import GradientCapture
from attribution.curvature.gauss_newton import GaussNewton, eager_attention
from attribution.data.batching import TokenBatch
from attribution.log_prob import DEFAULT_CHUNK_BYTES, identity_output_layer
from attribution.models import find_tracked_modules, in_block
from attribution.scoring.contraction import contraction_costs, plan_contractions
from attribution.scoring.stages import QUERY_CHUNK_BYTES

FACTOR_BYTES = 4
EIGH_BYTES_PER_SQUARE = 32
HEAD_CHUNK_COPIES = {"sampled": 5, "data": 4}


@dataclass(frozen=True)
class ModuleShape:
    d_in: int  # bias column included
    d_out: int


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs of a model, per block where it repeats."""

    outer_weight_bytes: int  # embeddings, output layer, final norm
    block_weight_bytes: int
    blocks: int
    block_modules: tuple[ModuleShape, ...]
    hidden: int
    vocabulary: int
    element_bytes: int
    saved_per_token: float  # s_1, bytes per token per block
    saved_per_token_pair: float  # s_2
    capture_copies: bool  # the capture copies a module's inputs and output gradients in its backward (bias column or dtype cast)
    block_parameters: int
    # g_1, g_2: bytes per token and token pair per block that a cached Gauss-Newton linearisation keeps
    # (its forward graph and the graph of u -> J^T u, eager attention).
    graph_per_token: float = 0.0
    graph_per_token_pair: float = 0.0

    @property
    def tracked_parameters(self) -> int:
        """P = sum_m o_m i_m."""
        return sum(m.d_out * m.d_in for m in self.modules)

    @property
    def weight_bytes(self) -> int:
        return self.outer_weight_bytes + self.blocks * self.block_weight_bytes

    @property
    def modules(self) -> tuple[ModuleShape, ...]:
        return self.block_modules * self.blocks

    def with_blocks(self, blocks: int) -> ModelShape:
        """The same model at another depth: a rehearsal's blocks multiplied out to the real model's."""
        return replace(self, blocks=blocks)


@dataclass(frozen=True)
class RunShape:
    batch: int
    sequence: int
    queries: int = 4
    query_batch: int = 16
    query_tokens: int = 128
    rank: int = 32
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    query_chunk_bytes: int = QUERY_CHUNK_BYTES
    dense_factors_mib: float = 2048
    # score.normalize: each document's gradient norm, taken in the candidate pass.
    normalize: bool = False
    # The refinement (0 sequences: none): its sample of ``refine_sequences`` sequences of ``refine_length``
    # tokens in batches of ``refine_batch``, the first ``refine_cached`` kept, ``refine_columns`` queries
    # solved together through ``refine_stages`` inverses; ``refine_workers`` > 0: the products on that
    # many workers, each holding every K-th batch (``refine.workers``).
    refine_sequences: int = 0
    refine_length: int = 128
    refine_batch: int = 8
    refine_cached: int = 64
    refine_columns: int = 8
    refine_stages: int = 1
    refine_workers: int = 0


# CG's vectors per query column at its peak, in the solver's precision: the right-hand side, the
# iterate, the residual, the direction, the product being summed and one chunk's parameter gradients
# (attribution/refine/solvers.py, attribution/curvature/gauss_newton.py); each further stage's input
# adds one.
SOLVER_VECTORS = 6
# Columns that go through the Gauss-Newton graphs together (GaussNewton.columns_per_product).
PRODUCT_COLUMNS = 8
# What one product's batched traversal of a batch's graphs holds at its peak, per column and sequence, in
# units of one sequence's kept graph: measured, not counted (autograd's buffers while it differentiates
# through the graph of u -> J^T u). On the Llama-3.2-1B-width block at 512 tokens one more column or one
# more sequence per batch added 2.2-3.0 graphs beyond the counted terms (docs/scale.md).
PRODUCT_GRAPHS = 3


class _Storages:
    """The distinct storages handed to :meth:`keep`, the model's own weights and buffers left out (what the
    backward reads of them is the model's, not activations)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.owned = {tensor.untyped_storage().data_ptr() for tensor in (*model.parameters(), *model.buffers())}
        self.sizes: dict[int, int] = {}

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.owned:
            self.sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())


def _probe_ids(model: PreTrainedModel, length: int) -> torch.Tensor:
    """One sequence of ``length`` distinct tokens, (1, length)."""
    device = next(model.parameters()).device
    return torch.arange(1, length + 1, device=device).remainder(model.get_input_embeddings().num_embeddings).unsqueeze(0)


def saved_bytes(model: PreTrainedModel, length: int) -> int:
    """Bytes kept for the backward of one sequence of ``length`` tokens, as the capture runs it (parameters
    frozen, the graph starting at the embeddings, the output layer applied apart): what autograd saves
    and the module inputs the capture holds, each storage once."""
    storages = _Storages(model)
    with GradientCapture(model, find_tracked_modules(model), lambda *args: None) as capture:
        with torch.autograd.graph.saved_tensors_hooks(storages.keep, lambda t: t), identity_output_layer(model):
            model(input_ids=_probe_ids(model, length))
        for tensor in capture.held():
            storages.keep(tensor)
    return storages.bytes


def graph_bytes(model: PreTrainedModel, length: int) -> int:
    """Bytes a cached Gauss-Newton linearisation keeps for one sequence of ``length`` tokens: what autograd
    saves for its forward and for the graph of ``u -> J^T u`` (under eager attention, as the products
    run), and its outputs and dual, each storage once."""
    storages = _Storages(model)
    ids = _probe_ids(model, length)
    ones = torch.ones_like(ids)
    batch = TokenBatch(["probe"], ["probe"], ids, ones, ones.bool(), [False])
    with eager_attention(model), torch.autograd.graph.saved_tensors_hooks(storages.keep, lambda t: t):
        operator = GaussNewton(model, find_tracked_modules(model), [batch])
        for tensor in operator.held():
            storages.keep(tensor)
    return storages.bytes


def _per_token_and_pair(probe: tuple[int, int, int], measured: list[float]) -> tuple[float, float]:
    """``c_1, c_2`` of ``bytes(T) = c_0 + c_1 T + c_2 T^2`` through three probe lengths (``c_0``: buffers
    made once per pass, such as a rotary table); ``c_2`` is at least zero."""
    lengths = torch.tensor(probe, dtype=torch.float64)
    _, per_token, per_pair = torch.linalg.solve(torch.stack([torch.ones(3, dtype=torch.float64), lengths, lengths**2], 1),
                                                torch.tensor(measured, dtype=torch.float64)).tolist()
    return per_token, max(0.0, per_pair)


def model_shape(model: PreTrainedModel, probe: tuple[int, int, int] = (32, 64, 128)) -> ModelShape:
    """The shape of ``model`` (its blocks as they are), with ``s_1, s_2`` and ``g_1, g_2`` from three probe lengths."""
    tracked = find_tracked_modules(model)
    block_names = {name for name, _ in model.named_parameters() if in_block(name)}
    element = next(model.parameters()).element_size()
    block_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in block_names)
    outer_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n not in block_names)
    blocks = int(getattr(model.config, "num_hidden_layers", 1))
    per_token, per_pair = _per_token_and_pair(probe, [float(saved_bytes(model, length)) for length in probe])
    graph_token, graph_pair = _per_token_and_pair(probe, [float(graph_bytes(model, length)) for length in probe])
    per_block_modules = len(tracked) // blocks
    return ModelShape(
        outer_weight_bytes=outer_bytes,
        block_weight_bytes=block_bytes // blocks,
        blocks=blocks,
        block_modules=tuple(ModuleShape(m.d_in_augmented, m.d_out) for m in tracked[:per_block_modules]),
        hidden=model.get_input_embeddings().embedding_dim,
        vocabulary=model.get_output_embeddings().out_features,
        element_bytes=element,
        saved_per_token=per_token / blocks,
        saved_per_token_pair=per_pair / blocks,
        capture_copies=any(m.bias for m in tracked) or element != FACTOR_BYTES,
        block_parameters=sum(p.numel() for n, p in model.named_parameters() if n in block_names) // blocks,
        graph_per_token=graph_token / blocks,
        graph_per_token_pair=graph_pair / blocks,
    )


def head_chunk_positions(shape: ModelShape, run: RunShape) -> int:
    return max(1, run.chunk_bytes // (FACTOR_BYTES * shape.vocabulary))


def forward_backward_bytes(shape: ModelShape, batch: int, sequence: int, run: RunShape, labels: str) -> float:
    """``F(B, T)``: activations kept, one block's gradients, the hidden state's gradient, a head chunk,
    the capture's copies of one module's inputs and output gradients."""
    tokens = batch * sequence
    activations = shape.blocks * (shape.saved_per_token * tokens + shape.saved_per_token_pair * batch * sequence**2)
    backward = shape.saved_per_token * tokens
    hidden_gradient = 2 * tokens * shape.hidden * FACTOR_BYTES
    head = HEAD_CHUNK_COPIES[labels] * min(head_chunk_positions(shape, run), tokens) * shape.vocabulary * FACTOR_BYTES
    copies = tokens * max(m.d_in + m.d_out for m in shape.modules) * FACTOR_BYTES if shape.capture_copies else 0
    return activations + backward + hidden_gradient + head + copies


def largest_part(sequences: int, batch: int, workers: int) -> int:
    """The sequences whose graphs one process holds: the whole sample, or with ``workers`` K the largest
    part, every K-th of its ``ceil(n / b)`` batches."""
    if not workers:
        return sequences
    batches = -(-sequences // batch)
    return min(sequences, -(-batches // workers) * batch)


def refinement_bytes(shape: ModelShape, run: RunShape) -> float:
    """The refinement's peak beside the weights and the eigen-form: the damping vector, CG's vectors for
    ``refine_columns`` queries, the kept graphs of the first ``refine_cached`` sequences and, when the sample
    is larger, one rebuilt batch's, and one product's temporaries (its traversal of a batch's graphs for up
    to ``PRODUCT_COLUMNS`` columns together, and a chunk of the output layer per column).

    With ``refine_workers`` K the graphs go to the workers: the solving process holds the solver's vectors
    and, per product, the sent copy, the sum and one worker's part (3 c P f more); each worker its
    ``ceil(n_batches / K)`` batches' graphs, the products' temporaries, and the received vectors and its sum
    (2 c P f). The larger of the two is the peak of the process that must fit."""
    f = FACTOR_BYTES
    P = shape.tracked_parameters
    T = run.refine_length

    def graphs(sequences: int) -> float:
        return sequences * shape.blocks * (shape.graph_per_token * T + shape.graph_per_token_pair * T**2)

    columns = min(run.refine_columns, run.query_batch, run.queries)
    through = min(columns, PRODUCT_COLUMNS)
    graph = graphs(1)
    # Graphs are kept a whole batch at a time (attribution/curvature/gauss_newton.py).
    n = largest_part(run.refine_sequences, run.refine_batch, run.refine_workers)
    kept = n if run.refine_cached >= n else run.refine_cached // run.refine_batch * run.refine_batch
    rebuilt = min(run.refine_batch, n) if n > kept else 0
    tokens = run.refine_batch * T
    temporaries = through * (PRODUCT_GRAPHS * run.refine_batch * graph
                             + 3 * min(head_chunk_positions(shape, run), tokens) * shape.vocabulary * f)
    solver = (SOLVER_VECTORS + run.refine_stages - 1) * columns * P * f
    if run.refine_workers:
        return max(P * f + solver + 3 * columns * P * f, graphs(kept) + graphs(rebuilt) + temporaries + 2 * columns * P * f)
    return P * f + solver + graphs(kept) + graphs(rebuilt) + temporaries


def stage_bytes(shape: ModelShape, run: RunShape) -> dict[str, float]:
    """Predicted peak bytes above the process's baseline, per stage (names as the scale benchmark marks them)."""
    f = FACTOR_BYTES
    modules = shape.modules
    weights = shape.weight_bytes
    tokens = run.batch * run.sequence
    covariances = sum(m.d_in**2 + m.d_out**2 for m in modules) * f
    eigenvalues = sum(m.d_out * m.d_in for m in modules) * f
    eigen_form = covariances + eigenvalues
    fit_pass = forward_backward_bytes(shape, run.batch, run.sequence, run, "sampled")
    score_pass = forward_backward_bytes(shape, run.batch, run.sequence, run, "data")
    query_pass = forward_backward_bytes(shape, min(run.query_batch, run.queries), run.query_tokens, run, "data")
    query_factors = run.queries * run.rank * sum(m.d_in + m.d_out for m in modules) * f
    rows = max(1, run.query_chunk_bytes // (max(m.d_out * m.d_in for m in modules) * f))
    rows = min(rows, run.queries, run.query_batch)
    # The candidate pass: the contraction each module gets (scoring's own plan), the dense query factors
    # of the per-document ones, and the larger of one module's temporaries; the scorer lays the query
    # factors out anew, so while it is built they are held twice.
    plan = plan_contractions({str(i): (m.d_in, m.d_out, run.rank) for i, m in enumerate(modules)}, run.queries, run.sequence,
                             f, run.dense_factors_mib * 2**20)
    per_document = [m for i, m in enumerate(modules) if plan[str(i)] == "per_document"]
    document_low_rank = [m for i, m in enumerate(modules) if plan[str(i)] == "document_low_rank"]
    dense = sum(run.queries * m.d_out * m.d_in for m in per_document) * f
    contraction = max([3 * tokens * run.queries * run.rank * f, *(run.batch * m.d_out * m.d_in * f for m in per_document),
                       *(run.batch * m.d_out * (m.d_in + 2 * run.queries * run.rank) * f for m in document_low_rank)])
    # A document's gradient norm, one sequence at a time: its two (T, T) Gram matrices or its gradient.
    contraction += max(min(2 * run.sequence**2, m.d_out * m.d_in) for m in modules) * f if run.normalize else 0
    return {
        "load model": weights,
        "covariance pass": weights + fit_pass + covariances + max(tokens * (m.d_in + m.d_out) for m in modules) * f,
        "eigendecomposition": weights + 2 * covariances + max(EIGH_BYTES_PER_SQUARE * max(m.d_in, m.d_out) ** 2 for m in modules),
        "eigenvalue pass": weights + fit_pass + 2 * covariances + eigenvalues
        + max((tokens * (2 * m.d_in + m.d_out) + m.d_out * m.d_in) * f for m in modules),
        "load store": weights + eigen_form,
        "query gradients": weights + eigen_form + query_pass + query_factors
        + max(2 * rows * m.d_out * m.d_in * f for m in modules),
        "candidate pass": weights + query_factors + dense + max(query_factors, score_pass + contraction),
        "token scores": weights + query_factors + dense + max(query_factors, score_pass + contraction + tokens * run.queries * f),
        # Multi-stage: every stage's model and eigen-form (a fine-tuned descendant has the pretrained shapes).
        **({"refinement": run.refine_stages * (weights + eigen_form) + refinement_bytes(shape, run)}
           if run.refine_sequences else {}),
    }


def stage_multiply_adds(shape: ModelShape, run: RunShape) -> dict[str, float]:
    """Multiply-adds of the matrix products of each stage (the forward is ``P_block`` per token per block
    plus ``T H`` for attention scores and values, the capture's backward as much again, the output
    layer ``H V`` per target position each way)."""
    tokens = run.batch * run.sequence
    modules = shape.modules

    def forward_backward(batch: int, sequence: int, targets: int) -> float:
        per_token = shape.blocks * (shape.block_parameters + 2 * sequence * shape.hidden)
        return 2 * batch * sequence * per_token + 2 * targets * shape.hidden * shape.vocabulary

    fit_pass = forward_backward(run.batch, run.sequence, tokens)
    rotations = tokens * sum(m.d_in**2 + m.d_out**2 for m in modules)
    query_tokens = run.queries * run.query_tokens
    return {
        "covariance pass": fit_pass + rotations,
        "eigenvalue pass": fit_pass + rotations + tokens * sum(m.d_in * m.d_out for m in modules),
        "query gradients": forward_backward(run.queries, run.query_tokens, query_tokens // 2)
        + query_tokens * sum(m.d_in**2 + m.d_out**2 + m.d_in * m.d_out for m in modules),
        # score.normalize adds, per module, at most the cheaper of the Gram matrices and the gradient (gradient_square_norms;
        # nothing but the squares where the contraction forms the gradient anyway).
        "candidate pass": fit_pass + run.batch * sum(_contraction_cost(m, run) + (min(run.sequence**2 * (m.d_in + m.d_out),
                                                                                      run.sequence * m.d_in * m.d_out)
                                                                                  if run.normalize else 0) for m in modules),
        "plain forward+backward": 1.5 * fit_pass,
    }


def _contraction_cost(module: ModuleShape, run: RunShape) -> int:
    """Multiply-adds of one sequence's contraction with the queries' factors in ``module``: the contraction scoring
    picks when no dense factors are kept (the cheaper of projecting every token and forming the document's gradient)."""
    costs = contraction_costs(module.d_in, module.d_out, run.queries, run.rank, run.sequence)
    return min(costs["low_rank"], costs["document_low_rank"])


def eigendecomposition_cubes(shape: ModelShape) -> float:
    """``sum_m (i_m^3 + o_m^3)``: eigendecomposition time is ``c`` times this."""
    return float(sum(m.d_in**3 + m.d_out**3 for m in shape.modules))


def measured_throughput(size: int = 2048, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """Multiply-adds per second of a (size x size) matrix product on this machine (median of 3)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        _ = a @ a
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    return size**3 / sorted(timings)[1]


def measured_eigh_constant(size: int = 2048) -> float:
    """``c`` in ``seconds = c d^3`` of a float64 symmetric eigendecomposition with vectors on this machine."""
    a = torch.randn(size, size, dtype=torch.float64)
    symmetric = a @ a.T
    started = time.perf_counter()
    torch.linalg.eigh(symmetric)
    return (time.perf_counter() - started) / size**3
