"""The results as TensorBoard runs: one directory per tracker run, ``LOGDIR/<run>/<method><n>/``, so that
TensorBoard lists ``base/raw1``, ``base/avg4``, ... beside the training run's own directory when LOGDIR is
the training's.

TensorBoard's rules (tensorboard/backend/event_processing/event_accumulator.py): the events of a run
directory are read file after file, in name order, and an event whose step is below the last one read
counts as a restart after a crash: the later events of its tags are purged. So each export writes, in a new
event file, only the steps past the last one the directory holds, in ascending order, every metric of a
step together, and never a ``purge_step``. What the directory holds is read back from its event files.
The tables go as text (markdown) at the last step, and again only when they changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ckpt_stability.export import Exported, missing_library, warn_refused
from ckpt_stability.export.records import TrackerRun
from ckpt_stability.export.settings import TensorBoardSettings

TRACKER = "TensorBoard"
TEXT_PLUGIN = "text"
TABLE_TAG = "tables/{name}"


@dataclass(frozen=True)
class Held:
    """What a run directory already holds."""

    steps: set[int]
    """the steps of its scalars"""
    texts: dict[str, str]
    """tag -> its last text (the tables)"""


def _read_held(directory: Path, loader) -> Held:
    """``loader``: TensorBoard's own reader of an event file (EventFileLoader)."""
    steps: set[int] = set()
    texts: dict[str, str] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in loader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == TEXT_PLUGIN:
                    texts[value.tag] = value.tensor.string_val[0].decode("utf-8")
                else:
                    steps.add(event.step)
    return Held(steps, texts)


def export(runs: list[TrackerRun], settings: TensorBoardSettings) -> list[Exported]:
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise missing_library(TRACKER, error) from None
    exported = []
    for run in runs:
        directory = settings.logdir / run.run / run.series
        held = _read_held(directory, EventFileLoader)
        points, refused = run.points_after(held.steps)
        warn_refused(TRACKER, run.name, refused)
        # SummaryWriter appends "/text_summary" to a text's tag
        tables = {f"{TABLE_TAG.format(name=table.name)}/text_summary": table for table in run.tables}
        changed = [table for tag, table in tables.items() if held.texts.get(tag) != table.markdown()]
        if points or changed:  # a writer starts a new event file, even with nothing to write
            writer = SummaryWriter(log_dir=str(directory))
            try:
                for point in points:
                    for metric, value in point.metrics.items():
                        writer.add_scalar(metric, value, point.step)
                last = max(held.steps | {point.step for point in points})
                for table in changed:
                    writer.add_text(TABLE_TAG.format(name=table.name), table.markdown(), last)
            finally:
                writer.close()
        exported.append(Exported(run.name, str(directory), tuple(point.step for point in points), tuple(refused),
                                 bool(changed)))
    return exported
