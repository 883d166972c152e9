"""A flat vector space over the tracked parameters, in the module layout of the scoring engine.

A vector is a (Q, P) tensor: Q columns (one per query), each the concatenation over
tracked modules, in order, of the row-major (d_out, d_in') matrix
``[W | b]`` of :meth:`TrackedModule.weight_gradient`. ``P = sum_m d_out d_in'``. The experts of a
fused mixture-of-experts parameter are separate modules here, each its slice of that parameter.
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
        """Every parameter that stores a tracked weight or bias, once, in layout order (a fused
        experts parameter, which stores several tracked modules, where its first one is)."""
        unique: dict[int, nn.Parameter] = {}
        for module in self.tracked:
            for piece in module.storage:
                unique.setdefault(id(piece.parameter), piece.parameter)
        return list(unique.values())

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """(Q, P) -> {name: (Q, d_out, d_in')}, views of ``flat``."""
        pieces = flat.split(self.sizes, dim=-1)
        return {m.name: piece.unflatten(-1, (m.d_out, m.d_in_augmented)) for m, piece in zip(self.tracked, pieces)}

    def join(self, matrices: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{name: (Q, d_out, d_in')} -> (Q, P)."""
        return torch.cat([matrices[m.name].flatten(-2) for m in self.tracked], dim=-1)

    def to_parameter_shapes(self, columns: torch.Tensor) -> list[torch.Tensor]:
        """(..., P) vectors as tensors shaped (..., *parameter.shape) like :attr:`parameters`
        (Conv1D weights transposed back to their stored (d_in, d_out); the experts of a fused
        parameter that are not tracked are zero)."""
        shaped: dict[int, torch.Tensor] = {}
        for module, matrix in zip(self.tracked, self.split(columns).values()):
            values = (matrix[..., : module.d_in], matrix[..., module.d_in]) if module.bias else (matrix,)
            for piece, value in zip(module.storage, values):
                stored = value.mT if piece.transposed else value
                key = id(piece.parameter)
                if piece.index is None:
                    shaped[key] = stored
                    continue
                batch = stored.shape[: stored.dim() - piece.parameter.dim() + 1]
                if key not in shaped:
                    shaped[key] = stored.new_zeros(*batch, *piece.parameter.shape)
                shaped[key].select(len(batch), piece.index).copy_(stored)
        return [shaped[id(parameter)] for parameter in self.parameters]

    def from_parameter_shapes(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Tensors shaped (..., *parameter.shape) like :attr:`parameters` -> (..., P) vectors."""
        first = tensors[0]
        batch = first.shape[: first.dim() - self.parameters[0].dim()]
        flat = torch.zeros(*batch, self.size, dtype=first.dtype, device=first.device)
        self.add_parameter_shapes(flat, tensors)
        return flat

    def add_parameter_shapes(self, flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        """``flat += `` the (..., P) vectors of ``tensors`` (shaped like :attr:`parameters`), module by
        module into views of ``flat``, so no second (..., P) vector is made."""
        by_parameter = {id(parameter): tensor for parameter, tensor in zip(self.parameters, tensors)}
        for module, view in zip(self.tracked, self.split(flat).values()):
            weight, *bias = [piece.take(by_parameter[id(piece.parameter)]) for piece in module.storage]
            if bias:
                view[..., : module.d_in] += weight
                view[..., module.d_in] += bias[0]
            else:
                view += weight
