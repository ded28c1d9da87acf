"""The results in experiment trackers (README, "Results in your experiment tracker"): TensorBoard, Weights &
Biases and MLflow, on the training step axis.

``records`` reads the results into one ``TrackerRun`` per score series (run, method, window); each tracker's
module writes them by that tracker's rules, sending only what the tracker does not hold yet, so that an
export of the same results changes nothing and a new checkpoint adds its steps. ``Exported`` says what one
export wrote, and ``write_receipt`` keeps it (the workflow's rule output, results/export/{tracker}.json).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ckpt_stability.atomic import write_text
from ckpt_stability.errors import InputError

log = logging.getLogger(__name__)

INSTALL = 'pip install -e ".[trackers]"'


class TrackerError(OSError):
    """The tracker could not be reached or refused a write: a transient failure, as a full disk is (exit 1,
    its message shown as is), so that the job fails and a rerun retries it."""


def missing_library(tracker: str, error: ImportError) -> InputError:
    """The error for a tracker whose library is not installed, naming the extra that brings it."""
    return InputError(f"exporting to {tracker} needs {error.name or 'its library'}, which is not installed: {INSTALL}")


@dataclass(frozen=True)
class Exported:
    """What one export wrote to one tracker run."""

    name: str
    """the tracker run's display name (``base avg4``)"""
    tracker_id: str
    """where the tracker keeps it: TensorBoard's run directory, W&B's run id, MLflow's run id"""
    steps: tuple[int, ...]
    """the steps whose metrics were written (every metric the tracker lacked at that step)"""
    refused_steps: tuple[int, ...] = ()
    """steps the tracker cannot take any more: a later step was exported before they were evaluated"""
    summary: bool = False
    """whether the tables (and the report) were sent: they changed, or were never sent"""


def warn_refused(tracker: str, name: str, steps: list[int]) -> None:
    if steps:
        log.warning("%s: %s: steps %s are not exported: %s already holds a later step, and its steps only go "
                    "forward", tracker, name, " ".join(map(str, steps)), tracker)


def write_receipt(path: Path, tracker: str, exported: list[Exported]) -> None:
    """What the export wrote, one entry per tracker run (the tracker runs it left as they were included)."""
    document = {"tracker": tracker, "runs": [dataclasses.asdict(entry) for entry in exported]}
    write_text(path, json.dumps(document, indent=1) + "\n")
