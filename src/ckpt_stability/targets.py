"""Fine-tuning outcomes -> ``results/tables/targets.csv``, the target of the pretraining indicators.

Each fine-tuned model's target is its ``overall`` score on the fine-tuning's target tasks (llm-jp-eval's
AVG, ``stability.overall_score``), read from its prediction files beside its fine-tuning record
(``layout.FINETUNE_RECORD``). One row per fine-tuned model: ``run, step, method, window, target``, the
target tasks (``tasks``), the recipe (``recipe``) and, for a model that could not be fine-tuned or
evaluated, the reason (``excluded``; its target is then empty).

The indicators read the rows of raw checkpoints (``method`` raw): a checkpoint's outcome is the score of
that checkpoint fine-tuned. Fine-tuned averaged models are rows of their own, for comparison.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from ckpt_stability.errors import InputError
from ckpt_stability.outcomes import EXCLUDED_KEY
from ckpt_stability.predictions import read_provenance
from ckpt_stability.stability import overall_score, write_table

COLUMNS = ["run", "step", "method", "window", "target", "tasks", "recipe", EXCLUDED_KEY]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not readable JSON ({error})") from None


def target_tasks(settings: Path) -> dict[str, str]:
    """Task name -> category, from the fine-tuned models' evaluation settings."""
    try:
        return {name: task["category"] for name, task in _read_json(settings)["tasks"].items()}
    except (KeyError, TypeError, AttributeError):
        raise InputError(f"{settings}: not evaluation settings of this workflow (tasks with their category)") from None


def targets_table(records: list[Path], settings: Path) -> pd.DataFrame:
    """One row per fine-tuning record (see the module's docstring), sorted by run, method, window and step."""
    category_of = target_tasks(settings)
    rows = []
    for path in records:
        record = _read_json(path)
        try:
            keys = {"run": record["run"], "step": int(record["step"]), "method": record["method"],
                    "window": int(record["window"])}
            recipe = record["recipe_text"]
        except (KeyError, ValueError, TypeError):
            raise InputError(f"{path}: not a fine-tuning record of this workflow (run, step, method, window, "
                             f"recipe_text)") from None
        provenances = {task: read_provenance(path.parent / f"{task}.parquet") for task in category_of}
        reason = record.get(EXCLUDED_KEY) or next(
            (p[EXCLUDED_KEY] for p in provenances.values() if p.get(EXCLUDED_KEY)), None)
        scores = pd.DataFrame([{task: p["score"] for task, p in provenances.items()}], dtype=float)
        target = math.nan if reason else float(overall_score(scores, category_of).iloc[0])
        rows.append({**keys, "target": target, "tasks": " ".join(category_of), "recipe": recipe,
                     EXCLUDED_KEY: reason})
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["run", "method", "window", "step"], ignore_index=True)


def write_targets(records: list[Path], settings: Path, output: Path) -> None:
    """targets.csv (and .md beside it)."""
    write_table(targets_table(records, settings), output)
