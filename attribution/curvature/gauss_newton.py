"""Gauss-Newton-vector products of the language-modelling loss over the tracked parameters.

With ``z_{n,t}`` the logits that predict target position ``t`` of sequence ``n`` (the
positions of the batch's ``target_mask``), ``p_{n,t} = softmax(z_{n,t})`` and
``J_{n,t} = dz_{n,t} / dtheta`` over the tracked weights and biases,

    G = (1/N) sum_n sum_t J_{n,t}^T H_{n,t} J_{n,t},      H_{n,t} = diag(p_{n,t}) - p_{n,t} p_{n,t}^T,

with ``N`` the number of sequences. ``H`` is the Hessian of the cross-entropy in the
logits, and also the covariance of its logit gradient ``p - e_y`` under labels
``y ~ p``, whose mean is zero. Labels are drawn independently per position given
the data inputs, so cross-position terms vanish and G equals the expected outer
product of the per-sequence pseudo-gradient ``g_n = grad sum_t -log p(y_{n,t})``,
averaged over sequences: the matrix whose eigenvalues EK-FAC fits (SPEC "Math"), on
the same per-sequence scale.

Each product costs one Jacobian-vector product and one vector-Jacobian product. The
JVP differentiates the linear map ``u -> J^T u`` (built once with ``create_graph``)
with respect to ``u``; both graphs are kept per batch, so repeated products (conjugate
gradient) never re-run the forward pass.

The logits are never held whole. When they are the output layer ``W`` applied to the last
hidden states ``h`` (and ``W`` is not tracked), ``J = W J_h`` and the product is taken in
hidden space,

    J^T H J v = J_h^T [W^T H (W (J_h v))],

the bracket a chunk of target positions at a time, so the largest tensor is (C, positions,
V) for one chunk (:data:`attribution.log_prob.DEFAULT_CHUNK_BYTES`). Other models (a soft-capped
or tracked output layer) are linearised at their logits, as :func:`attribution.log_prob.backward_log_prob`
falls back too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from transformers import PreTrainedModel

from attribution.curvature.parameters import ParameterLayout
from attribution.data.batching import TokenBatch
from attribution.log_prob import DEFAULT_CHUNK_BYTES, chunk_positions, head_is_last, identity_output_layer
from attribution.models import TrackedModule


def use_eager_attention(model: PreTrainedModel) -> None:
    """Switch to the eager attention: the same function, built from ops that have
    double-backward formulas (fused CPU/CUDA attention kernels have none)."""
    if model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")


@contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Gauss-Newton products need double backward, which fused attention kernels lack; the model's
    own attention is restored afterwards so the candidate pass keeps its speed."""
    before = model.config._attn_implementation
    use_eager_attention(model)
    try:
        yield
    finally:
        if before != "eager":
            model.set_attn_implementation(before)


@contextmanager
def only_these_require_grad(model: nn.Module, parameters: Sequence[nn.Parameter]) -> Iterator[None]:
    """Differentiate with respect to the tracked parameters only, restoring the flags after."""
    before = {parameter: parameter.requires_grad for parameter in model.parameters()}
    try:
        for parameter in before:
            parameter.requires_grad_(False)
        for parameter in parameters:
            parameter.requires_grad_(True)
        yield
    finally:
        for parameter, flag in before.items():
            parameter.requires_grad_(flag)


@dataclass
class _Linearisation:
    """One batch's forward graph and the graph of ``u -> J^T u``, at the outputs ``o``: the hidden
    states that the output layer ``head`` maps to logits, or (``head`` None) the logits themselves."""

    outputs: torch.Tensor  # (B, T-1, H or V), predicting positions 1..T-1
    dual: torch.Tensor  # u, shaped like outputs
    # The graph of J_o^T u, one edge per parameter: the edges, not the tensors, so that the (zero) values
    # J_o^T 0, as large as the tracked parameters, are not held per batch.
    transpose: tuple[GradientEdge, ...]
    rows: torch.Tensor  # (n,) sequence of each target position
    columns: torch.Tensor  # (n,) its place in outputs
    head: nn.Linear | None


class GaussNewton:
    """The operator ``V -> G V`` on (Q, P) vectors of :class:`ParameterLayout`.

    ``cache=True`` keeps both graphs of the first batches, up to ``cached_sequences`` sequences
    (None: every batch), for repeated products (memory about twice a training step's activations per
    sequence); the other batches, and every batch with ``cache=False``, are rebuilt per product (one
    more forward and backward each), so memory is bounded by ``cached_sequences`` whatever the sample's
    size. ``columns_per_product`` columns share one pass through the graphs. The model is switched to
    eager attention (see :func:`use_eager_attention`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tracked: Sequence[TrackedModule],
        batches: Iterable[TokenBatch],
        cache: bool = True,
        columns_per_product: int = 8,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        cached_sequences: int | None = None,
    ) -> None:
        use_eager_attention(model)
        self.model = model
        self.layout = ParameterLayout(tracked)
        self.chunk_bytes = chunk_bytes
        head = model.get_output_embeddings()
        # In hidden space when the logits are the output layer's map of the hidden states.
        self._head = head if head_is_last(model) and not any(m.module is head for m in tracked) else None
        self.device = next(model.parameters()).device
        self.batches = [batch.to(self.device) for batch in batches]
        self.num_sequences = sum(len(batch.ids) for batch in self.batches)
        if self.num_sequences == 0:
            raise ValueError("the Gauss-Newton operator needs at least one sequence")
        self.dtype = next(model.parameters()).dtype
        # Columns differentiated together: memory grows with it (C copies of the backward's buffers).
        self.columns_per_product = max(1, columns_per_product)
        self._cached: list[_Linearisation] = []
        kept = 0
        for batch in self.batches if cache else []:
            if cached_sequences is not None and kept + len(batch.ids) > cached_sequences:
                break
            self._cached.append(self._linearise(batch))
            kept += len(batch.ids)

    @property
    def size(self) -> int:
        return self.layout.size

    def held(self) -> list[torch.Tensor]:
        """The cached batches' outputs and duals (the graphs' saved tensors aside), for memory probes."""
        return [tensor for lin in self._cached for tensor in (lin.outputs, lin.dual)]

    def _linearise(self, batch: TokenBatch) -> _Linearisation:
        parameters = self.layout.parameters
        head = self._head
        with only_these_require_grad(self.model, parameters), torch.enable_grad():
            if head is not None:
                with identity_output_layer(self.model):
                    outputs = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            else:
                outputs = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            dual = torch.zeros_like(outputs, requires_grad=True)
            transpose = tuple(get_gradient_edge(t) for t in torch.autograd.grad(outputs, parameters, dual, create_graph=True))
        rows, columns = batch.target_mask[:, 1:].nonzero(as_tuple=True)
        return _Linearisation(outputs, dual, transpose, rows.to(self.device), columns.to(self.device), head)

    def _linearisations(self) -> Iterator[_Linearisation]:
        yield from self._cached
        for batch in self.batches[len(self._cached):]:
            yield self._linearise(batch)

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """``G V = (1/N) S V`` for V of shape (Q, P) (or (P,)), in V's precision (at least float32)."""
        single = vectors.dim() == 1
        result = self.total(vectors.reshape(-1, self.size)).div_(self.num_sequences)
        return result[0] if single else result

    def total(self, vectors: torch.Tensor) -> torch.Tensor:
        """``S V = sum_n sum_t J_{n,t}^T H_{n,t} J_{n,t} V`` over this operator's sequences, for (Q, P) V: the
        unnormalised sum, which parts of a sample split over workers add up (:mod:`attribution.refine.product_pool`).
        The batches' products are added into the result in place, so it is the only (Q, P) tensor made here
        besides one chunk's parameter gradients."""
        vectors = vectors.to(self.device)
        result = torch.zeros(vectors.shape, dtype=torch.promote_types(vectors.dtype, torch.float32), device=self.device)
        for lin in self._linearisations():
            for start in range(0, vectors.shape[0], self.columns_per_product):
                chunk = vectors[start : start + self.columns_per_product].to(self.dtype)
                self._add_product(lin, chunk, result[start : start + len(chunk)])
        return result

    def _add_product(self, lin: _Linearisation, chunk: torch.Tensor, out: torch.Tensor) -> None:
        """``out += sum_t J_t^T H_t J_t v`` of one batch for the (C, P) columns of ``chunk``.

        ``J_o v`` is the derivative of ``u -> (J_o^T u) . v`` in ``u``; the curvature at the outputs
        (:meth:`_output_curvature`) goes back through ``J_o^T``. Columns go through autograd together
        (``is_grads_batched``, a vmap over the backward graph): one traversal of the graph instead of C.
        """
        parameters = self.layout.parameters
        tangents = self.layout.to_parameter_shapes(chunk)
        forward = torch.autograd.grad(lin.transpose, lin.dual, tangents, retain_graph=True, is_grads_batched=True)[0]
        curvature = self._output_curvature(lin, forward)
        back = torch.autograd.grad(lin.outputs, parameters, curvature.to(lin.outputs.dtype), retain_graph=True,
                                   is_grads_batched=True)
        self.layout.add_parameter_shapes(out, back)

    def _output_curvature(self, lin: _Linearisation, forward: torch.Tensor) -> torch.Tensor:
        """(C, B, T-1, H or V): ``W^T H_t W w_t`` (hidden space) or ``H_t w_t`` (logits) at every target position
        ``t`` of the (C, B, T-1, ·) directions ``w = J_o v``, zero elsewhere, with
        ``H_t x = p_t * (x - p_t . x)``; target positions a chunk at a time."""
        curvature = torch.zeros_like(forward)
        wide = torch.promote_types(lin.outputs.dtype, torch.float32)
        vocabulary = lin.outputs.shape[-1] if lin.head is None else lin.head.out_features
        step = chunk_positions(vocabulary * forward.shape[0], self.chunk_bytes)
        for start in range(0, len(lin.rows), step):
            rows, columns = lin.rows[start:start + step], lin.columns[start:start + step]
            outputs, directions = lin.outputs.detach()[rows, columns], forward[:, rows, columns]
            if lin.head is not None:
                weight = lin.head.weight
                logits, directions = lin.head(outputs), directions @ weight.T
            else:
                logits = outputs
            p = torch.softmax(logits.to(wide), dim=-1)
            directions = directions.to(wide)
            hessian_times = p * (directions - (p * directions).sum(-1, keepdim=True))
            if lin.head is not None:
                hessian_times = hessian_times.to(weight.dtype) @ weight
            curvature[:, rows, columns] = hessian_times.to(curvature.dtype)
        return curvature


def dense_gauss_newton(operator: GaussNewton, chunk: int = 64) -> torch.Tensor:
    """The explicit (P, P) matrix, one product per basis vector: for small models only."""
    size = operator.size
    columns = []
    for start in range(0, size, chunk):
        basis = torch.zeros(min(chunk, size - start), size, dtype=torch.float64)
        basis[:, start : start + basis.shape[0]] = torch.eye(basis.shape[0], dtype=torch.float64)
        columns.append(operator(basis))
    matrix = torch.cat(columns)
    # Round-off leaves the product slightly asymmetric; G is symmetric by construction.
    return (matrix + matrix.T) / 2
