"""The names of the curvature strategies, kept free of torch so settings can be checked before it loads.

What each strategy means is in :mod:`attribution.curvature.factors`.
"""

from __future__ import annotations

from typing import Literal

Strategy = Literal["ekfac", "kfac", "diagonal", "identity"]
STRATEGIES: tuple[str, ...] = ("ekfac", "kfac", "diagonal", "identity")
