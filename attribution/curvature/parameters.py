"""A flat vector space over the tracked parameters, in the module layout of the scoring engine.

A vector is a (Q, P) tensor: Q columns (one per query), each the concatenation over
tracked modules, in order, of the row-major (d_out, d_in') matrix
``[W | b]`` of :meth:`TrackedModule.weight_gradient`. ``P = sum_m d_out d_in'``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from attribution.models import TrackedModule


class ParameterLayout:
    """Conversions between flat vectors, per-module matrices and the parameters' own shapes."""

    def __init__(self, tracked: Sequence[TrackedModule]) -> None:
        self.tracked = list(tracked)
        self.sizes = [m.d_out * m.d_in_augmented for m in self.tracked]
        self.size = sum(self.sizes)

    @property
    def parameters(self) -> list[nn.Parameter]:
        """Weight (and bias) of every tracked module, in layout order."""
        result = []
        for module in self.tracked:
            result.append(module.module.weight)
            if module.bias:
                result.append(module.module.bias)
        return result

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """(Q, P) -> {name: (Q, d_out, d_in')}, views of ``flat``."""
        pieces = flat.split(self.sizes, dim=-1)
        return {m.name: piece.unflatten(-1, (m.d_out, m.d_in_augmented)) for m, piece in zip(self.tracked, pieces)}

    def join(self, matrices: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{name: (Q, d_out, d_in')} -> (Q, P)."""
        return torch.cat([matrices[m.name].flatten(-2) for m in self.tracked], dim=-1)

    def to_parameter_shapes(self, columns: torch.Tensor) -> list[torch.Tensor]:
        """(..., P) vectors as tensors shaped (..., *parameter.shape) like :attr:`parameters`
        (Conv1D weights transposed back to their stored (d_in, d_out))."""
        shaped = []
        for module, matrix in zip(self.tracked, self.split(columns).values()):
            weight = matrix[..., : module.d_in]
            shaped.append(weight.mT if module.transposed else weight)
            if module.bias:
                shaped.append(matrix[..., module.d_in])
        return shaped

    def from_parameter_shapes(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Tensors shaped (..., *parameter.shape) like :attr:`parameters` -> (..., P) vectors."""
        pieces = iter(tensors)
        matrices = []
        for module in self.tracked:
            weight = next(pieces)
            matrix = weight.mT if module.transposed else weight
            if module.bias:
                matrix = torch.cat([matrix, next(pieces).unsqueeze(-1)], dim=-1)
            matrices.append(matrix.flatten(-2))
        return torch.cat(matrices, dim=-1)
