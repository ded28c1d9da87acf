"""The report's look: each method's colour, line style and label (from the registry of methods), and
the figures' other colours and sizes."""

from __future__ import annotations

from matplotlib.colors import LinearSegmentedColormap

from ckpt_stability import methods as registry

RAW = registry.RAW.name
METHODS = [method.name for method in registry.METHODS]
METHOD_LABELS = {method.name: method.label for method in registry.METHODS}
METHOD_COLORS = {method.name: method.color for method in registry.METHODS}
METHOD_STYLES = {method.name: method.style for method in registry.METHODS}
HEATMAP_EXAMPLES = 20
HEATMAP_STEPS = 120
"""The heatmaps show at most this many of the last steps (always the whole final segment)."""
SEGMENT_COLOR = "#e6e6e6"
EXCLUDED_STYLE = {"color": "#c0392b", "ls": ":", "lw": 1.4}
SCORE_COLORS = LinearSegmentedColormap.from_list("score", ["#e8912d", "#f7f7f7", "#2166ac"])
DPI = 110
INDICATOR_SCORE_PROXIES = 15
INDICATOR_COLORS = {"score": "#0173b2", "perplexity": "#cc78bc", "comparator": "#de8f05"}
