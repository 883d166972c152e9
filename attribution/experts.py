"""Per-expert linear maps of the fused mixture-of-experts layers of ``transformers``.

A fused experts module (a class decorated with ``transformers.integrations.moe.use_experts_implementation``:
Mixtral, OLMoE, Qwen2/3-MoE, DeepSeek-V3, gpt-oss, ...) keeps all E experts' weights in 3-D
parameters (``gate_up_proj`` (E, d_out, d_in), ``down_proj``; (E, d_in, d_out) when transposed)
and computes

    y_t = sum_{e routed to t} w_{t,e} down_e(act(gate_up_e(x_t)))

through whichever kernel ``config._experts_implementation`` names (``grouped_mm`` by default, also
on CPU), none of which calls a module per expert. :func:`install_expert_views` replaces that
module's ``forward`` by the same computation written with one :class:`ExpertLinear` per expert
and projection, so each expert's linear map is a module that hooks can see.

Each view is called with all N = B*T tokens of the batch, rows not routed to its expert set to
zero, and returns zero on those rows: with ``a_t = 0`` and ``ds_t = 0`` there, the expert's
weight gradient ``dW_e = sum_t ds_t a_t^T`` sums over its routed tokens only, exactly, and the
per-token layout (B*T, d) keeps every token in its sequence. Only the routed rows are multiplied;
the zero rows cost memory, not arithmetic. The routing weight ``w_{t,e}`` multiplies the
expert's output after ``down_proj``, so ``down_proj``'s ``ds`` carries it.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

# Attributes that ``use_experts_implementation`` gives every experts module it decorates.
_DECORATOR_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "_is_expert_parallel")


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module of the ``use_experts_implementation`` contract."""
    return all(hasattr(module, flag) for flag in _DECORATOR_FLAGS) and isinstance(getattr(module, "down_proj", None), nn.Parameter)


def projection_names(experts: nn.Module) -> tuple[str, str]:
    """The fused weights in call order: (``gate_up_proj`` or ``up_proj``, ``down_proj``)."""
    return ("gate_up_proj" if experts.has_gate else "up_proj"), "down_proj"


class ExpertLinear(nn.Module):
    """Expert ``expert``'s slice of the fused weight ``weight_name`` of an experts module, as a linear map.

    It holds no parameter of its own: the fused parameter stays the one the model saves,
    fingerprints and trains. The experts module is kept as a plain reference, not a submodule,
    since it is the view's parent.
    """

    def __init__(self, experts: nn.Module, weight_name: str, expert: int) -> None:
        super().__init__()
        self.__dict__["experts"] = experts
        self.weight_name = weight_name
        self.bias_name = f"{weight_name}_bias" if experts.has_bias else None
        self.expert = expert
        self.transposed = bool(experts.is_transposed)
        rows, columns = self.fused_weight.shape[1:]
        self.in_features, self.out_features = (rows, columns) if self.transposed else (columns, rows)

    @property
    def fused_weight(self) -> nn.Parameter:
        """(E, d_out, d_in), or (E, d_in, d_out) when transposed."""
        return getattr(self.experts, self.weight_name)

    @property
    def fused_bias(self) -> nn.Parameter | None:
        """(E, d_out) or None."""
        return None if self.bias_name is None else getattr(self.experts, self.bias_name)

    def forward(self, inputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(N, d_in) inputs, zero off ``rows`` -> (N, d_out) outputs, zero off ``rows``; only ``rows`` are computed."""
        weight = self.fused_weight[self.expert]
        bias = None if self.fused_bias is None else self.fused_bias[self.expert]
        selected = inputs[rows]
        if self.transposed:
            routed = selected @ weight if bias is None else selected @ weight + bias
        else:
            routed = F.linear(selected, weight, bias)
        return routed.new_zeros(inputs.shape[0], self.out_features).index_copy(0, rows, routed)

    def extra_repr(self) -> str:
        return f"{self.weight_name}[{self.expert}], in_features={self.in_features}, out_features={self.out_features}"


def expert_views(experts: nn.Module) -> list[ExpertLinear]:
    """The views of an experts module, expert by expert, (first projection, ``down_proj``) each;
    installed on the first call (see the module docstring), the same objects afterwards."""
    first, second = projection_names(experts)
    count = getattr(experts, second).shape[0]
    if not isinstance(getattr(experts, "0", None), nn.ModuleDict):
        for expert in range(count):
            experts.add_module(str(expert), nn.ModuleDict({name: ExpertLinear(experts, name, expert) for name in (first, second)}))
        experts.forward = types.MethodType(routed_forward, experts)
    return [getattr(experts, str(expert))[name] for expert in range(count) for name in (first, second)]


def routed_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' forward of the ``use_experts_implementation`` contract, through the views.

    ``hidden_states`` (N, H), ``top_k_index`` and ``top_k_weights`` (N, K). Every expert's views
    run, also with no routed token, so that every view reports its (zero) gradient.
    """
    first, second = projection_names(self)
    output = torch.zeros_like(hidden_states)
    tokens = hidden_states.shape[0]
    for expert in range(getattr(self, second).shape[0]):
        views = getattr(self, str(expert))
        routed = top_k_index == expert
        # A token's weight for this expert: the weight of its slot that names it (0 elsewhere).
        weight = torch.where(routed, top_k_weights, torch.zeros_like(top_k_weights)).sum(-1)
        rows = routed.any(-1).nonzero().squeeze(-1)
        inputs = hidden_states.new_zeros(hidden_states.shape).index_copy(0, rows, hidden_states[rows])
        projected = views[first](inputs, rows)[rows]
        inner = self._apply_gate(projected) if self.has_gate else self.act_fn(projected)
        inner = inner.new_zeros(tokens, inner.shape[-1]).index_copy(0, rows, inner)
        out = views[second](inner, rows)[rows]
        if self.has_post_expert_norm:
            out = self.post_expert_norm(out)
        output.index_add_(0, rows, (out * weight[rows, None]).to(output.dtype))
    return output
