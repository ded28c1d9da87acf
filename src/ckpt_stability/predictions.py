"""Prediction files: ``results/predictions/{run}/{method}{n}/step{step}/{task}.parquet``.

One row per example: ``example_id`` (int), ``prediction`` (str), ``gold`` (str), ``score`` (float) and
``choice_logprobs`` (list of float, or null). The schema metadata key ``ckpt_stability`` holds the
provenance as JSON: model, backend and library versions, the task (file hash, category, mode,
metric, labels), the prompt settings and hashes, and the task score.

A model that could not be evaluated (``errors.UnusableCheckpoint``: a diverged or broken checkpoint, or
an ensemble or average whose window contains one) still gets its files: no rows, a NaN score, and the
reason under the provenance key ``excluded``. The reductions leave such models out and say why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ckpt_stability.atomic import atomic_file
from ckpt_stability.errors import InputError
from ckpt_stability.outcomes import EXCLUDED_KEY

METADATA_KEY = b"ckpt_stability"
SCHEMA = pa.schema([
    pa.field("example_id", pa.int64(), nullable=False),
    pa.field("prediction", pa.string(), nullable=False),
    pa.field("gold", pa.string(), nullable=False),
    pa.field("score", pa.float64(), nullable=False),
    pa.field("choice_logprobs", pa.list_(pa.float64()), nullable=True),
])


@dataclass
class Predictions:
    """The predictions of one model (or ensemble) on one task."""

    example_id: np.ndarray
    prediction: list[str]
    gold: list[str]
    score: np.ndarray
    choice_logprobs: np.ndarray | None
    """[examples, choices] for choice tasks, else None"""
    provenance: dict

    @property
    def excluded(self) -> str | None:
        """Why this model was left out, or None for a model that was evaluated."""
        return self.provenance.get(EXCLUDED_KEY)

    @property
    def task_score(self) -> float:
        return float(np.mean(self.score)) if len(self.score) else float("nan")


def excluded_predictions(reason: str, provenance: dict) -> Predictions:
    """The predictions file of a model that could not be evaluated: no rows, the reason in the provenance."""
    return Predictions(example_id=np.zeros(0, np.int64), prediction=[], gold=[], score=np.zeros(0),
                       choice_logprobs=None, provenance={**provenance, EXCLUDED_KEY: reason})


def write_predictions(path: str | Path, predictions: Predictions) -> None:
    provenance = dict(predictions.provenance, score=predictions.task_score, n_examples=len(predictions.score))
    logprobs = (pa.nulls(len(predictions.score), pa.list_(pa.float64()))
                if predictions.choice_logprobs is None
                else pa.array([list(map(float, row)) for row in predictions.choice_logprobs],
                              pa.list_(pa.float64())))
    table = pa.table(
        [pa.array(predictions.example_id, pa.int64()), pa.array(predictions.prediction, pa.string()),
         pa.array(predictions.gold, pa.string()), pa.array(predictions.score, pa.float64()), logprobs],
        schema=SCHEMA.with_metadata({METADATA_KEY: json.dumps(provenance, ensure_ascii=False)}),
    )
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def _check_exists(path: str | Path) -> None:
    if not Path(path).is_file():
        raise InputError(f"{path}: prediction file is missing")


def read_provenance(path: str | Path) -> dict:
    """The provenance of a prediction file, from its footer only (cheap)."""
    _check_exists(path)
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"{path}: not a readable parquet file ({error})") from None
    if METADATA_KEY not in metadata:
        raise InputError(f"{path}: not a prediction file of this workflow (no {METADATA_KEY.decode()} metadata)")
    return json.loads(metadata[METADATA_KEY])


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    _check_exists(path)
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"{path}: not a readable parquet file ({error})") from None


def read_predictions(path: str | Path) -> Predictions:
    table = read_table(path)
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    metadata = table.schema.metadata or {}
    if METADATA_KEY not in metadata:
        raise InputError(f"{path}: not a prediction file of this workflow (no {METADATA_KEY.decode()} metadata)")
    logprobs_column = table.column("choice_logprobs")
    logprobs = None
    if logprobs_column.null_count < len(table):
        logprobs = np.array(logprobs_column.to_pylist(), dtype=float)
    return Predictions(
        example_id=table.column("example_id").to_numpy(),
        prediction=table.column("prediction").to_pylist(),
        gold=table.column("gold").to_pylist(),
        score=table.column("score").to_numpy(),
        choice_logprobs=logprobs,
        provenance=json.loads(metadata[METADATA_KEY]),
    )
