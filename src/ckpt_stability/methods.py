"""The methods: how the score of a step with a window is obtained (README, "Definitions").

The one list of them. The plan, the rules, the ensembles, the reductions, the report and the indicators
ask it, so that adding a method is one entry here plus the code that produces it (an ensemble: a
function of that name in ``ensemble.py``; a model: a rule that builds it) and its documentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EVALUATE = "evaluate"
"""Produced by evaluating a model (the checkpoint itself, or one built from the window's checkpoints)."""
ENSEMBLE = "ensemble"
"""Produced by combining the window's raw prediction files (``ensemble.py``, no model runs)."""


@dataclass(frozen=True)
class Method:
    name: str
    """As in file names (``{name}{n}``), the config's ``methods`` and the tables' ``method`` column."""
    label: str
    """In words, for the report."""
    produced_by: str
    """EVALUATE or ENSEMBLE."""
    color: str
    """Its colour in the report's figures."""
    style: dict = field(default_factory=dict)
    """Its line style in the report's figures (matplotlib keywords): distinct markers and dashes keep
    methods with equal values apart where their lines overlap."""
    choice_only: bool = False
    """Exists for choice tasks only."""

    def covers(self, mode: str) -> bool:
        """Whether the method exists for a task of this scoring mode."""
        return mode == "choice" or not self.choice_only


RAW = Method("raw", "raw checkpoint", EVALUATE, "#333333", {"lw": 1.0})
"""The baseline: the checkpoint itself, window 1 only; every other method is computed for each window n > 1."""
AVG = Method("avg", "weight averaging", EVALUATE, "#0173b2", {"marker": "o", "ls": "-", "ms": 7, "lw": 2.2})
"""The model averaged over the window (built by rule average, then evaluated)."""
VOTE = Method("vote", "majority vote", ENSEMBLE, "#de8f05", {"marker": "s", "ls": "--", "ms": 5, "lw": 1.8})
PROB = Method("prob", "probability averaging", ENSEMBLE, "#029e73", {"marker": "^", "ls": ":", "ms": 4, "lw": 1.6},
              choice_only=True)

METHODS = (RAW, AVG, VOTE, PROB)
"""In the order of tables, figures and the plan's series: raw first."""

BY_NAME = {method.name: method for method in METHODS}
STABILISERS = METHODS[1:]
"""The methods the config's ``methods`` chooses from (the Snakefile gives their names to the schema)."""


def produced_by(producer: str) -> list[Method]:
    """The methods that EVALUATE or ENSEMBLE produces, in order."""
    return [method for method in METHODS if method.produced_by == producer]


def covered_tasks(method: str, modes: dict[str, str]) -> list[str]:
    """The tasks (name -> scoring mode) that a method exists for, in their order."""
    return [name for name, mode in modes.items() if BY_NAME[method].covers(mode)]
