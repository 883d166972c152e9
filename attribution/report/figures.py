"""The report's charts as plotly figure specs; the page draws each with plotly.js when it is opened.

Layouts are built once per report, traces once per query, both through ``plotly.graph_objects``
so every property is validated here, at build time, not in the reader's browser.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

# Diverging, zero at the middle: blue raises the completion's probability, red lowers it.
DIVERGING = [[0.0, "#b2182b"], [0.5, "#f7f7f7"], [1.0, "#2166ac"]]
POSITIVE, NEGATIVE, SHOWN = "#2166ac", "#b2182b", "#f58518"
_BLOCK = re.compile(r"\.(\d+)\.")
# Plotly's mode bar (its toolbar) covers the top strip of a chart on hover: titles sit below it.
MODEBAR = 34


def layouts(num_modules: int, largest_position: int) -> dict[str, dict[str, Any]]:
    """One layout per chart kind, shared by every query; ``largest_position`` is the last position
    any query's rank chart shows."""
    base = {"margin": {"l": 60, "r": 20, "t": MODEBAR + 36, "b": 50}, "paper_bgcolor": "white", "plot_bgcolor": "white",
            "font": {"size": 12}}
    share = {**base, "height": MODEBAR + 280, "xaxis": _axis("layer", type="category"),
             "yaxis": _axis("share", tickformat=".0%")}
    return {
        "layers": go.Layout(
            **base, height=MODEBAR + max(260, 18 * num_modules + 120), title=_title("Score per tracked module (top documents)"),
            xaxis=_axis("document (rank)", type="category"), yaxis=_axis(None, autorange="reversed", type="category", dtick=1),
        ).to_plotly_json(),
        "share": go.Layout(**share, title=_title("Share of the top documents' total score, per layer")).to_plotly_json(),
        "run_share": go.Layout(**share, title=_title("Share of the total score per layer, every query's top documents")).to_plotly_json(),
        "distribution": go.Layout(
            **{**base, "margin": {**base["margin"], "b": 100}}, height=MODEBAR + 340, showlegend=True,
            legend={"orientation": "h", "y": -0.42},
            title=_title("Kept scores by position among the documents scored"),
            # Log positions: the top rows spread out, and bottom rows of a large corpus stay in view.
            xaxis=_axis("position among the documents scored (1 = highest score)", type="log",
                        tickvals=rank_ticks(largest_position)),
            yaxis=_axis("score", exponentformat="e"),
        ).to_plotly_json(),
    }


def _title(text: str) -> dict[str, Any]:
    """A chart title just below the mode bar's strip."""
    return {"text": text, "y": 1, "yref": "container", "yanchor": "top", "pad": {"t": MODEBAR}}


def _axis(title: str | None, **settings: Any) -> dict[str, Any]:
    """An axis whose margin grows to fit its labels: module names and document ids are long, and
    at narrow widths the labels turn and would be cut off by fixed margins."""
    return {**({"title": {"text": title}} if title else {}), "automargin": True, **settings}


def rank_ticks(largest: int) -> list[int]:
    """Round positions for the log rank axis: 1, 2, 5, 10, 20, 50, ... over up to three decades,
    powers of ten beyond (where 1-2-5 labels would collide), up to the first one at or above
    ``largest`` (the axis's padding may reach it). Set explicitly: plotly's own log ticks label
    the digits between decades ("2 3 4 5 6"), which read as stray numbers."""
    steps = (1, 2, 5) if largest <= 1000 else (1,)
    ticks, decade = [], 1
    while not ticks or ticks[-1] < largest:
        ticks += [step * decade for step in steps]
        decade *= 10
    return ticks[:next(i for i, tick in enumerate(ticks) if tick >= largest) + 1]


def short_module_names(modules: Sequence[str]) -> list[str]:
    """Module names without the prefix they all share (``gpt_neox.layers.``)."""
    if len(modules) < 2:
        return list(modules)
    prefix = modules[0]
    for name in modules[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    cut = prefix.rfind(".") + 1 if "." in prefix else 0
    return [name[cut:] or name for name in modules]


def layer_blocks(modules: Sequence[str]) -> list[str]:
    """The transformer block of each module (its first ``.N.`` index), or the module itself."""
    return [f"layer {match.group(1)}" if (match := _BLOCK.search(name)) else name for name in modules]


def significant(values: Any, digits: int = 4) -> list:
    """Values (nested lists too) to ``digits`` significant digits: what a chart can show, in a third of the bytes."""
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if isinstance(values, list):
        return [significant(v, digits) for v in values]
    return float(f"{values:.{digits}g}")


def layer_heatmap(modules: Sequence[str], documents: Sequence[str], layer_scores: np.ndarray) -> dict[str, Any]:
    """Modules x documents, ``layer_scores[d, m]``; colour centred on zero."""
    return go.Heatmap(
        z=significant(np.asarray(layer_scores, dtype=np.float64).T), x=list(documents), y=short_module_names(modules),
        colorscale=DIVERGING, zmid=0, colorbar={"title": {"text": "score"}, "exponentformat": "e"},
        hovertemplate="%{y}<br>%{x}<br>%{z:.4g}<extra></extra>",
    ).to_plotly_json()


def layer_shares(modules: Sequence[str], layer_scores: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Per block b, ``sum_d sum_{m in b} layer_scores[d, m] / sum_d score_d``: shares of the total
    score of the documents given (the scores are the sums of their layer scores)."""
    blocks = layer_blocks(modules)
    names = list(dict.fromkeys(blocks))
    per_module = np.asarray(layer_scores, dtype=np.float64).sum(axis=0)
    total = per_module.sum()
    sums = np.array([per_module[[i for i, b in enumerate(blocks) if b == name]].sum() for name in names])
    return names, (sums / total if total != 0 else np.zeros_like(sums))


def share_bars(names: Sequence[str], shares: np.ndarray) -> dict[str, Any]:
    return go.Bar(
        x=list(names), y=significant(shares), marker={"color": [POSITIVE if s >= 0 else NEGATIVE for s in shares]},
        hovertemplate="%{x}: %{y:.1%}<extra></extra>",
    ).to_plotly_json()


def distribution(positive: Sequence[float], negative: Sequence[float], shown: int, scored: int | None) -> list[dict[str, Any]]:
    """The kept rows at their position among the ``scored`` documents: the top rows at 1..k, the
    bottom rows at scored-b+1..scored; the documents in between are not stored. The first
    ``shown`` top rows (those the report lists) are marked."""
    traces = [
        go.Scatter(x=list(range(1, min(shown, len(positive)) + 1)), y=significant(list(positive[:shown])), mode="markers",
                   name=f"top {min(shown, len(positive))} (listed below)", marker={"color": SHOWN, "size": 9},
                   hovertemplate="rank %{x}: %{y:.4g}<extra></extra>").to_plotly_json(),
    ]
    if len(positive) > shown:
        traces.append(go.Scatter(x=list(range(shown + 1, len(positive) + 1)), y=significant(list(positive[shown:])), mode="markers",
                                 name="other kept top rows", marker={"color": POSITIVE, "size": 6},
                                 hovertemplate="rank %{x}: %{y:.4g}<extra></extra>").to_plotly_json())
    if negative:
        end = scored if scored else len(positive) + len(negative)
        traces.append(go.Scatter(x=[end - i for i in range(len(negative))], y=significant(list(negative)), mode="markers",
                                 name="kept bottom rows", marker={"color": NEGATIVE, "size": 6},
                                 hovertemplate="position %{x}: %{y:.4g}<extra></extra>").to_plotly_json())
    return traces


def last_position(traces: Sequence[dict[str, Any]]) -> int:
    """The largest position a rank chart's traces show."""
    return max((max(trace["x"]) for trace in traces if trace["x"]), default=1)
