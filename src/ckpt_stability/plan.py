"""The plan of a workflow run: which prediction files exist, and the final segment.

The workflow writes it as ``results/plan.json``; the reductions read it, so that both enumerate the
same files by the output contract (``layout.PREDICTIONS``) and the same methods (``methods.METHODS``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ckpt_stability import layout
from ckpt_stability.errors import InputError
from ckpt_stability.averaging_schemes import effective_step
from ckpt_stability.methods import RAW, Registry, registry

PICK_RANGES = ("all", "final")
"""the checkpoints among which the pick is made (config ``pick.range``): every step of a series, or the
final segment (``Plan.segment``)"""


@dataclass(frozen=True)
class PlannedTask:
    """What the reductions need to know of a task: its category (llm-jp-eval's, or the user's; category rows
    average their tasks) and its scoring mode, choice or generate (which methods exist for it)."""

    category: str
    mode: str


@dataclass(frozen=True)
class Plan:
    """What the workflow evaluated: the runs' steps, windows, methods and tasks."""

    runs: dict[str, list[int]]
    windows: list[int]
    methods: list[str]
    tasks: dict[str, PlannedTask]
    """name -> the task (given as a PlannedTask, or as its fields, as in plan.json)"""
    final_fraction: float = 0.2
    predictions: str = layout.PREDICTIONS_DIR
    averaging: dict[str, dict] = field(default_factory=dict)
    """the config's averaging methods (name -> scheme, shape, half_life, windows): ``methods.registry``"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", {name: task if isinstance(task, PlannedTask) else PlannedTask(**task)
                                           for name, task in self.tasks.items()})

    @classmethod
    def from_json(cls, path: str | Path) -> "Plan":
        try:
            return cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as error:  # TypeError: a missing or unknown field
            raise InputError(f"{path}: invalid plan ({error})") from None

    @cached_property
    def registry(self) -> Registry:
        """The methods, with the configured averaging methods."""
        return registry(self.averaging)

    def series(self, run: str) -> list[tuple[str, int, list[int], list[str]]]:
        """(method, window, steps, tasks) of every score series of a run: raw, then for each window n > 1 the
        configured methods computed for it, in the registry's order, each on the tasks it covers."""
        steps = self.runs[run]
        result = [(RAW.name, 1, steps, self.covered_tasks(RAW.name))]
        for window in sorted(w for w in self.windows if w > 1):
            for method in self.registry.stabilisers:
                if method.name in self.methods and (method.windows is None or window in method.windows):
                    result.append((method.name, window, steps[window - 1:], self.covered_tasks(method.name)))
        return result

    def covered_tasks(self, method: str, among: list[str] | None = None) -> list[str]:
        """The tasks (of ``among``, default all) that ``method`` exists for, in their order."""
        modes = {name: self.tasks[name].mode for name in (self.tasks if among is None else among)}
        return self.registry.covered_tasks(method, modes)

    def coefficients(self, run: str, method: str, window: int, step: int) -> tuple[list[int], list[float]]:
        """The steps of the model or ensemble of ``method`` with ``window`` at ``step``, and their coefficients:
        the averaging method's scheme's, equal ones for an ensemble (each member weighs the same), [1] for raw."""
        steps = self.runs[run]
        end = steps.index(step)
        members = steps[end - window + 1:end + 1]
        scheme = self.registry[method].scheme
        return members, scheme.coefficients(members) if scheme else [1 / len(members)] * len(members)

    def effective_step(self, run: str, method: str, window: int, step: int) -> float:
        """Σ_j c_j s_j of ``coefficients``: where the model or ensemble sits on the step axis."""
        return effective_step(*self.coefficients(run, method, window, step))

    def path(self, run: str, method: str, window: int, step: int, task: str) -> Path:
        return Path(layout.predictions(self.predictions, run=run, method=method, n=window, step=step, task=task))

    def segment(self, run: str) -> list[int]:
        return final_segment(self.runs[run], self.final_fraction, max(self.windows))


def final_segment(steps: list[int], final_fraction: float, largest_window: int) -> list[int]:
    """The last ``ceil(final_fraction * len(steps))`` steps (at least 3), among those where the largest
    window exists, so that every method and window is compared on the same steps."""
    length = max(3, math.ceil(final_fraction * len(steps) - 1e-9))
    eligible = steps[largest_window - 1:]
    if len(eligible) < 3:
        raise InputError(f"{len(steps)} checkpoints leave {len(eligible)} steps where the largest window "
                         f"({largest_window}) exists; the final segment needs 3")
    return eligible[-length:]
