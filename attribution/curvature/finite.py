"""NaN and Inf in a fit: stopped where they enter, named, and never written into a store.

One non-finite value poisons every sum it enters, so a fit that meets one can only produce
factors of NaN. Three checks stop it with one line that names what to look at:

- The weights, before the fit (:func:`check_parameters`). A NaN or Inf weight makes every
  sequence non-finite, so it is always an error, and the parameter is the clearest thing to
  name; one ``isfinite`` per parameter costs less than one forward pass.
- The running sums of each pass, after the all-reduce (:func:`check_covariance_sums`,
  :func:`check_eigenvalue_sums`). A value that turns non-finite at run time (an overflow on
  some sequences) shows up there. Every worker holds the same reduced sums, so all raise the
  same error at the same point: a worker that raised mid-pass on its own would leave the
  others waiting in the next collective. The sums also say where the value entered: a
  module's activation covariance is non-finite from the first module whose input is, and the
  backward pass carries a non-finite output gradient from where it starts to every module
  before it.
- Every factor tensor, before a fit returns and before a store is written (:func:`check_factors`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from attribution.curvature.accumulators import CovarianceSums, EigenvalueSums
from attribution.curvature.factors import ModuleFactors
from attribution.errors import UserError

# Sequence ids named in a message before "and N more".
_IDS_SHOWN = 3


class NonFiniteError(UserError, ValueError):
    """A NaN or Inf in the model's weights, in a fitting pass, or in factors about to be stored."""


def check_parameters(model: nn.Module, owner: str) -> None:
    """Every parameter finite, else an error naming the first one that is not.

    ``owner`` names the model in the message (``model.path=...``).
    """
    check_parameter_counts([(name, nonfinite_count(parameter.detach()), parameter.numel())
                            for name, parameter in model.named_parameters()], owner)


def check_parameter_counts(counts: Sequence[tuple[str, int, int]], owner: str) -> None:
    """:func:`check_parameters` on (name, non-finite count, size) of every parameter in model order,
    for a loader that reads the parameters one at a time."""
    broken = [entry for entry in counts if entry[1]]
    if not broken:
        return
    name, count, size = broken[0]
    others = f" (and {len(broken) - 1} more parameters)" if len(broken) > 1 else ""
    raise NonFiniteError(f"{owner}: parameter {name} has {count} non-finite values (NaN or Inf) of {size}{others}; "
                         "every sequence would give NaN factors, so nothing was fitted")


def check_covariance_sums(sums: CovarianceSums, seen_in: Sequence[str] | None) -> None:
    """Reduced covariance sums all finite, else an error naming where the non-finite value entered.

    Modules are in the model's module order, its forward order for the supported architectures.
    The first module with a non-finite ``A`` is the first whose input is non-finite (or so large
    that ``a a^T`` overflows): the fault is in what feeds it. With every ``A`` finite, the last
    module with a non-finite ``S`` is the first the backward pass reaches with a non-finite
    gradient: the fault is between its output and the next module, or the loss (NaN or Inf logits).
    """
    names = list(sums.activation)
    for name in names:
        if not _finite(sums.activation[name]):
            raise NonFiniteError(f"the activations entering module {name} are NaN or Inf (or overflow "
                                 f"{_dtype(sums.activation[name])} in their covariance) in the covariance pass"
                                 f"{_where(seen_in)}; the fault is in what feeds that module")
    broken = [name for name in names if not _finite(sums.gradient[name])]
    if broken:
        after = names[names.index(broken[-1]) + 1] if broken[-1] != names[-1] else None
        until = f"the input of module {after}" if after else "the loss (NaN or Inf logits)"
        raise NonFiniteError(f"the output gradients of module {broken[-1]} are NaN or Inf in the covariance pass"
                             f"{_where(seen_in)}, with finite activations: the fault is between its output and {until}")


def check_eigenvalue_sums(sums: EigenvalueSums, seen_in: Sequence[str] | None) -> None:
    """Reduced eigenvalue sums ``sum_n (Q_S^T dW_n Q_A)^2`` all finite, else an error naming the first module.

    The covariance pass saw the same activations and gradients finite, so this is an overflow
    of the squared per-sequence gradients in the accumulation dtype.
    """
    for name, squares in sums.squares.items():
        if not _finite(squares):
            raise NonFiniteError(f"the squared per-sequence gradients of module {name} overflow {_dtype(squares)} "
                                 f"in the eigenvalue pass{_where(seen_in)}; factors.dtype=float64 holds larger ones")


def check_factors(modules: Mapping[str, ModuleFactors], what: str) -> None:
    """Every tensor of every module's factors finite, else an error naming the module and tensor."""
    for name, factors in modules.items():
        for tensor_name, tensor in factors.as_dict().items():
            if count := nonfinite_count(tensor):
                raise NonFiniteError(f"{what}: module {name}: {tensor_name} has {count} non-finite values (NaN or Inf)")


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many entries are NaN or Inf. The minimum and maximum are both finite exactly when every
    entry is, and reducing to them allocates nothing the size of the tensor (a mask of a 128k x 4096
    embedding is 0.5 GB), so the entries are counted only when there is something to count."""
    if tensor.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all()):
        return 0
    return tensor.numel() - int(torch.isfinite(tensor).sum().item())


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all().item())


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _where(seen_in: Sequence[str] | None) -> str:
    """Where this worker first saw it; another worker's share may hold it instead (then None)."""
    if not seen_in:
        return ""
    shown = ", ".join(seen_in[:_IDS_SHOWN])
    more = f" and {len(seen_in) - _IDS_SHOWN} more" if len(seen_in) > _IDS_SHOWN else ""
    return f" (first in the batch of sequences {shown}{more})"
