"""The methods: how the score of a step with a window is obtained (README, "Definitions").

The one list of them. The plan, the rules, the ensembles, the reductions, the report and the indicators
ask it, so that adding a method is one entry here plus the code that produces it (an ensemble: a
function of that name in ``ensemble.py``; a model: a rule that builds it) and its documentation. Averaging
methods with other schemes than the uniform mean are named in the config (``averaging``): ``registry`` adds
them, and rule average builds their models as it builds avg's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ckpt_stability.averaging_schemes import Scheme

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
    scheme: Scheme | None = None
    """An averaging method's weighting of the window's checkpoints (rule average builds its models); None for the
    others."""
    windows: tuple[int, ...] | None = None
    """The windows it is computed for (config ``averaging.<name>.windows``); None: every configured window."""

    def covers(self, mode: str) -> bool:
        """Whether the method exists for a task of this scoring mode."""
        return mode == "choice" or not self.choice_only


RAW = Method("raw", "raw checkpoint", EVALUATE, "#333333", {"lw": 1.0})
"""The baseline: the checkpoint itself, window 1 only; every other method is computed for each window n > 1."""
AVG = Method("avg", "weight averaging", EVALUATE, "#0173b2", {"marker": "o", "ls": "-", "ms": 7, "lw": 2.2},
             scheme=Scheme())
"""The model averaged uniformly over the window (built by rule average, then evaluated). Further averaging methods,
with other schemes, are named in the config (``averaging``, ``with_averaging``)."""
VOTE = Method("vote", "majority vote", ENSEMBLE, "#de8f05", {"marker": "s", "ls": "--", "ms": 5, "lw": 1.8})
PROB = Method("prob", "probability averaging", ENSEMBLE, "#029e73", {"marker": "^", "ls": ":", "ms": 4, "lw": 1.6},
              choice_only=True)

AVERAGING_STYLES = (("#cc78bc", "D"), ("#ca9161", "v"), ("#56b4e9", "P"), ("#d55e00", "X"), ("#949494", "*"))
"""The colours and markers of the configured averaging methods besides avg, in their order (cycled)."""


@dataclass(frozen=True)
class Registry:
    """The methods of a workflow: raw, the averaging methods (avg, then those named in the config), vote, prob.
    In the order of tables, figures and the plan's series."""

    methods: tuple[Method, ...]

    def __getitem__(self, name: str) -> Method:
        for method in self.methods:
            if method.name == name:
                return method
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [method.name for method in self.methods]

    @property
    def stabilisers(self) -> list[Method]:
        """The methods the config's ``methods`` chooses from: all but raw."""
        return [method for method in self.methods if method is not RAW]

    @property
    def averaging(self) -> list[Method]:
        """The methods whose models rule average builds."""
        return [method for method in self.methods if method.scheme is not None]

    def produced_by(self, producer: str) -> list[Method]:
        """The methods that EVALUATE or ENSEMBLE produces, in order."""
        return [method for method in self.methods if method.produced_by == producer]

    def covered_tasks(self, method: str, modes: dict[str, str]) -> list[str]:
        """The tasks (name -> scoring mode) that a method exists for, in their order."""
        return [name for name, mode in modes.items() if self[method].covers(mode)]


def registry(averaging: Mapping[str, Mapping] | None = None) -> Registry:
    """The methods with the averaging methods of the config's ``averaging`` (name -> scheme, shape, half_life and
    windows, as ``averaging_schemes.Scheme`` and ``Method.windows``). ``avg`` is always there and always uniform:
    the config may restrict its windows only, so that existing configs and results keep their meaning."""
    averaging = dict(averaging or {})
    settings = dict(averaging.pop(AVG.name, {}))
    windows = settings.pop("windows", None)
    if Scheme(**settings) != AVG.scheme:
        raise ValueError(f"{AVG.name} is the uniform mean, got {settings}")
    named = [replace(AVG, windows=None if windows is None else tuple(windows))]
    for number, (name, settings) in enumerate(averaging.items()):
        if name in BUILTIN.names:
            raise ValueError(f"{name} is a built-in method's name")
        settings = dict(settings)
        windows = settings.pop("windows", None)
        scheme = Scheme(**settings)
        color, marker = AVERAGING_STYLES[number % len(AVERAGING_STYLES)]
        named.append(Method(name, f"{AVG.label}, {scheme.description}", EVALUATE, color,
                            {"marker": marker, "ls": "-.", "ms": 6, "lw": 1.9}, scheme=scheme,
                            windows=None if windows is None else tuple(windows)))
    return Registry((RAW, *named, VOTE, PROB))


BUILTIN = Registry((RAW, AVG, VOTE, PROB))
"""The methods without configured averaging methods: what ensembles (vote, prob) are looked up in."""
