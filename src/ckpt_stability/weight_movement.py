"""How far the weights move: relative distances between checkpoints, measured by the averages as they read them.

For a window's members θ_0 ... θ_{n-1} (oldest first) and its average θ̄, an average with ``diagnostics`` adds,
per tensor group (``GROUPS``, by name: ``tensor_group``) and over all floating-point tensors (``total``):

* for each member j > 0, its relative distance to the previous one, ‖θ_j − θ_{j−1}‖ / ‖θ_{j−1}‖;
* the mean relative distance of the members to the average, (1/n) Σ_j ‖θ_j − θ̄‖ / ‖θ̄‖, with θ̄ the average in
  the accumulator's precision (before the cast to the output dtype).

Norms are Euclidean norms over all elements of the group's tensors, summed in float64 in data order (so the same
pair gives the same figure in every window that holds it). Nothing is read for it that the average does not
read: each chunk's members are read a second time while still in the page cache.

``results/tables/weights.csv`` (``layout.WEIGHTS``) gathers them, one row per (run, method, window, step,
group): method ``raw`` (window 1) rows are the checkpoints' distances to the previous checkpoint, each pair
measured by any average that holds both (a pair that only averages with an unusable checkpoint hold has no row);
the averaging methods' rows are their members' mean distance to the average.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ckpt_stability import layout
from ckpt_stability.atomic import atomic_file, write_text
from ckpt_stability.errors import InputError
from ckpt_stability.methods import RAW
from ckpt_stability.outcomes import EXCLUDED_KEY
from ckpt_stability.plan import Plan

TOTAL = "total"
GROUPS = ("embeddings", "attention", "mlp", "norms", "head", "other")
_PATTERNS = (  # the first that matches a tensor's name (lower case) gives its group: norms inside attention first
    ("norms", re.compile(r"norm|(^|[._])ln(_|\d|\.)")),
    ("head", re.compile(r"lm_head|embed_out|^output\.|\.output_layer\.")),
    ("embeddings", re.compile(r"embed|\bwte\b|\bwpe\b")),
    ("attention", re.compile(r"attn|attention|[qkvo]_proj|query|key|value")),
    ("mlp", re.compile(r"mlp|feed_forward|ffn|fc\d|(gate|up|down)_proj|h_to_4h|4h_to_h|experts|\bw[123]\b")),
)
COLUMNS = ["run", "method", "window", "step", "previous_step", "group", "relative_distance"]


def tensor_group(name: str) -> str:
    """The group of a tensor by its name (Hugging Face, Megatron and GPT-2 naming): one of GROUPS."""
    lowered = name.lower()
    return next((group for group, pattern in _PATTERNS if pattern.search(lowered)), "other")


class SquaredSums:
    """The squared norms an average accumulates per group while it reads a window of n members: each member's,
    each member's distance to the previous one and to the average, and the average's."""

    def __init__(self, members: int) -> None:
        self.members = members
        self.groups: dict[str, np.ndarray] = {}

    @staticmethod
    def size(members: int) -> int:
        """The length of one chunk's sums: members, pairs, distances to the average, the average."""
        return 3 * members

    def add(self, tensor: str, chunk: np.ndarray) -> None:
        """Add one chunk's sums (``size`` float64 values, in the order of ``size``), in data order."""
        group = tensor_group(tensor)
        if group not in self.groups:
            self.groups[group] = np.zeros(self.size(self.members))
        self.groups[group] += chunk

    def distances(self, steps: list[int]) -> "WindowDistances":
        n = self.members
        groups = {group: self.groups[group] for group in GROUPS if group in self.groups}
        if groups:
            groups = {TOTAL: sum(groups.values()), **groups}
        pairs, to_average = {}, {}
        for group, sums in groups.items():
            norms, pair_sums, to_mean, mean = sums[:n], sums[n:2 * n - 1], sums[2 * n - 1:3 * n - 1], sums[-1]
            pairs[group] = [_ratio(pair_sums[j], norms[j]) for j in range(n - 1)]
            to_average[group] = float(np.mean([_ratio(value, mean) for value in to_mean]))
        return WindowDistances(steps=list(steps), pairs=pairs, to_average=to_average)


def _ratio(squared_distance: float, squared_norm: float) -> float:
    return math.sqrt(squared_distance) / math.sqrt(squared_norm) if squared_norm > 0 else math.nan


@dataclass(frozen=True)
class WindowDistances:
    """What an average measured (module docstring), as its diagnostics file (``layout.WEIGHT_DISTANCES``) holds."""

    steps: list[int]
    """the members' steps, oldest first"""
    pairs: dict[str, list[float]]
    """group -> the relative distance of member j to member j-1, j = 1 .. n-1"""
    to_average: dict[str, float]
    """group -> the members' mean relative distance to the average"""

    def write(self, path: Path) -> None:
        write_text(path, json.dumps(asdict(self), indent=1) + "\n")


def write_excluded(path: Path, reason: str) -> None:
    """The diagnostics file of an average that was not built: the reason, no distances."""
    write_text(path, json.dumps({EXCLUDED_KEY: reason}, ensure_ascii=False, indent=1) + "\n")


def read_distances(path: Path) -> WindowDistances | None:
    """An average's diagnostics; None when the average was not built (an unusable member)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        return None if EXCLUDED_KEY in record else WindowDistances(**record)
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"{path}: not a weight-distance file ({error})") from None


def weights_table(plan: Plan):
    """weights.csv (module docstring), a DataFrame, from the diagnostics files of every average of the plan."""
    import pandas as pd  # not at the top: averaging jobs import this module and never need pandas

    rows, measured = [], set()
    for run in plan.runs:
        for method, window, steps, _ in plan.series(run):
            if plan.registry[method].scheme is None:
                continue
            for step in steps:
                path = Path(layout.fill(layout.WEIGHT_DISTANCES, run=run, method=method, n=window, step=step))
                distances = read_distances(path)
                if distances is None:
                    continue
                for group, value in distances.to_average.items():
                    rows.append((run, method, window, step, None, group, value))
                for j, (previous, current) in enumerate(zip(distances.steps, distances.steps[1:])):
                    if (run, current) not in measured:
                        measured.add((run, current))
                        rows += [(run, RAW.name, 1, current, previous, group, values[j])
                                 for group, values in distances.pairs.items()]
    frame = pd.DataFrame(rows, columns=COLUMNS).astype({"previous_step": "Int64"})
    order = {name: number for number, name in enumerate(plan.registry.names)}
    groups = {name: number for number, name in enumerate((TOTAL, *GROUPS))}
    return frame.sort_values(["run", "method", "window", "step", "group"], key=lambda column: column.map(
        order if column.name == "method" else groups) if column.name in ("method", "group") else column,
        ignore_index=True)


def write_weights_table(plan_path: Path, output: Path) -> None:
    with atomic_file(output) as tmp:
        weights_table(Plan.from_json(plan_path)).to_csv(tmp, index=False)
