"""Hooks that hand each tracked module's layer input ``a`` and output gradient ``ds`` to a callback.

The weight gradient of a linear module for one sequence is ``dW = sum_t ds_t a_t^T``;
everything downstream (covariances, corrected eigenvalues, scores) is built from
``a`` and ``ds`` without ever asking autograd for ``dW``. Parameter gradients are
therefore switched off while capturing: autograd only propagates activation
gradients, which is about half the work of a training backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from attribution.models import ModelError, TrackedModule

GradientCallback = Callable[[TrackedModule, torch.Tensor, torch.Tensor], None]


def augment_with_bias(inputs: torch.Tensor, bias: bool) -> torch.Tensor:
    """``a' = [a, 1]`` so that the bias is one more column of the weight."""
    if not bias:
        return inputs
    return torch.cat([inputs, inputs.new_ones(*inputs.shape[:-1], 1)], dim=-1)


class GradientCapture:
    """Context manager: during backward, ``callback(module, a, ds)`` runs once per tracked module.

    ``a`` is (B, T, d_in') with the bias column, ``ds`` is (B, T, d_out), both cast to
    ``dtype``. Padding positions are not masked here: callers own the mask. A module that sees
    the batch's tokens flattened, (B*T, d) (an expert's view, :mod:`attribution.experts`), is
    reported in the same (B, T, d) layout; one that sees a different number of rows cannot be
    placed in its sequences and is refused.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tracked: Sequence[TrackedModule],
        callback: GradientCallback,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.tracked = list(tracked)
        self.callback = callback
        self.dtype = dtype
        self._inputs: dict[str, torch.Tensor] = {}
        self._tokens: torch.Size | None = None  # (B, T) of the current forward pass
        self._handles: list[RemovableHandle] = []
        self._requires_grad: dict[nn.Parameter, bool] = {}

    def __enter__(self) -> GradientCapture:
        for parameter in self.model.parameters():
            self._requires_grad[parameter] = parameter.requires_grad
            parameter.requires_grad_(False)
        embeddings = self.model.get_input_embeddings()
        self._handles.append(embeddings.register_forward_hook(self._start_graph_at_embeddings))
        for tracked in self.tracked:
            self._handles.append(tracked.module.register_forward_hook(self._forward_hook(tracked)))
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for parameter, requires_grad in self._requires_grad.items():
            parameter.requires_grad_(requires_grad)
        self._requires_grad.clear()
        self._inputs.clear()

    def _start_graph_at_embeddings(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # Parameters are frozen, so the graph must start from the embedded tokens for
        # gradients to reach the tracked modules' outputs. A new forward pass also
        # forgets inputs of a previous pass that never ran backward.
        self._inputs.clear()
        self._tokens = output.shape[:-1]
        output.requires_grad_(True)

    def _forward_hook(self, tracked: TrackedModule) -> Callable:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            if tracked.name in self._inputs:
                raise ModelError(f"module {tracked.name} ran twice in one forward pass; shared modules cannot be tracked")
            # Kept as the model made it until this module's backward: a bias column or a dtype cast here
            # would copy every tracked input of the pass at once (40 GiB at 8B in bfloat16, 8 x 2,048 tokens).
            self._inputs[tracked.name] = self._per_token(tracked, inputs[0].detach())
            output.register_hook(self._backward_hook(tracked))

        return hook

    def _backward_hook(self, tracked: TrackedModule) -> Callable:
        def hook(grad_output: torch.Tensor) -> None:
            activations = augment_with_bias(self._inputs.pop(tracked.name).to(self.dtype), tracked.bias)
            self.callback(tracked, activations, self._per_token(tracked, grad_output.detach()).to(self.dtype))

        return hook

    def held(self) -> list[torch.Tensor]:
        """The module inputs kept for the backward pass now (the memory model counts them)."""
        return list(self._inputs.values())

    def _per_token(self, tracked: TrackedModule, values: torch.Tensor) -> torch.Tensor:
        """``values`` as (B, T, d): as they are, or unflattened from (B*T, d)."""
        if self._tokens is None or values.shape[:-1] == self._tokens:
            return values
        if values.dim() == 2 and values.shape[0] == self._tokens.numel():
            return values.unflatten(0, self._tokens)
        raise ModelError(
            f"module {tracked.name} saw {tuple(values.shape[:-1])} positions where the batch has {tuple(self._tokens)} tokens: "
            "it sees only some of them (a routed expert?), so its gradient cannot be split by sequence; "
            "leave it out with a model.tracked_modules regex"
        )
