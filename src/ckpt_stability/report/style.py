"""The report's look: which methods it shows, in which order (the plan's registry of methods, whose ``Method``
objects carry each method's colour, line style and label), and the figures' other colours and sizes."""

from __future__ import annotations

from matplotlib.colors import LinearSegmentedColormap

from ckpt_stability.methods import RAW as RAW_METHOD, Method
from ckpt_stability.plan import Plan

RAW = RAW_METHOD.name
HEATMAP_EXAMPLES = 20
HEATMAP_STEPS = 120
"""The heatmaps show at most this many of the last steps (always the whole final segment)."""
SEGMENT_COLOR = "#e6e6e6"
EXCLUDED_STYLE = {"color": "#c0392b", "ls": ":", "lw": 1.4}
SCORE_COLORS = LinearSegmentedColormap.from_list("score", ["#e8912d", "#f7f7f7", "#2166ac"])
DPI = 110
INDICATOR_PROXIES_PER_KIND = 15
"""The indicators figure shows at most this many of the best proxies of each kind."""
INDICATOR_COLORS = {"score": "#0173b2", "perplexity": "#cc78bc", "weights": "#029e73", "comparator": "#de8f05"}
WEIGHT_TOTAL_STYLE = {"color": "#333333", "lw": 1.8}
"""The weight movement of the whole model; each parameter group's is a faint line of the ``tab10`` colours."""


def shown_methods(plan: Plan) -> list[Method]:
    """Raw and the configured methods, in the registry's order: the report's rows, columns and legends."""
    return [method for method in plan.registry.methods if method.name == RAW or method.name in plan.methods]


def series_windows(plan: Plan, run: str) -> dict[str, list[int]]:
    """Method name -> the windows the run has a score series of, ascending (an averaging method may be
    configured for some windows only); the shown methods that have none are left out."""
    windows: dict[str, list[int]] = {}
    for method, window, _, _ in plan.series(run):
        windows.setdefault(method, []).append(window)
    return {method.name: sorted(windows[method.name]) for method in shown_methods(plan) if method.name in windows}
