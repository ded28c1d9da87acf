"""The results as Weights & Biases runs: one eval run per tracker run, grouped with the training run.

W&B's rules (docs "Log metrics" / "Customize log axes", and wandb/sdk/wandb_run.py): a run's history rows
carry an internal ``_step`` that only increases, so an evaluation of step 480 cannot be written into the
training run after step 1000 (allenai/OLMo#736). Each (run, method, window) is therefore a run of its own, in
the group named by the config (default: the training run's name), with a deterministic id, so that every
export of it continues the same run. Its metrics are plotted against ``train/step``
(``define_metric("eval/*", step_metric="train/step")``), the checkpoint's step logged in every row, rows in
ascending step order; ``_step`` is the row's number in the run, continued across exports.

In offline mode each export that has something to send is one offline run directory under ``DIR/wandb/``,
which ``wandb sync`` uploads later (the directories of one run id, in order, continue the same run). W&B's
offline files cannot be read back by the wandb library, so what each run holds is kept beside them in
``DIR/ckpt-stability-wandb.json``, written once W&B has taken the run: a new export sends only the steps past
those, and the tables and the report only when they changed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckpt_stability.atomic import write_text
from ckpt_stability.errors import InputError
from ckpt_stability.export import Exported, TrackerError, missing_library, warn_refused
from ckpt_stability.export.records import PREFIX, STEP_METRIC, TrackerRun
from ckpt_stability.export.settings import WandbSettings

TRACKER = "W&B"
LEDGER = "ckpt-stability-wandb.json"
REPORT_ARTIFACT = "ckpt-stability-report"
ID_LENGTH = 64
"""W&B's limit on a run id"""


@dataclass(frozen=True)
class Held:
    """What W&B holds of one run, as the ledger records it."""

    steps: list[int] = field(default_factory=list)
    rows: int = 0
    """history rows written: the next row's ``_step``"""
    summary: str = ""
    """the digest of the tables and report last sent"""


def run_id(settings: WandbSettings, run: TrackerRun) -> str:
    """The same id at every export: the group (when set), the run and the series, in W&B's allowed characters,
    with a hash of the full name where it is too long."""
    name = "-".join(filter(None, [settings.group, run.run, run.series]))
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", name)
    if len(safe) > ID_LENGTH:
        safe = f"{safe[:ID_LENGTH - 13]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return safe


def _read_ledger(path: Path) -> dict[str, Held]:
    if not path.is_file():
        return {}
    try:
        return {key: Held(**value) for key, value in json.loads(path.read_text(encoding="utf-8")).items()}
    except (ValueError, TypeError, AttributeError) as error:
        raise InputError(f"{path}: not this workflow's record of its W&B runs ({error}); delete it to export "
                         f"every run anew") from None


def _write_ledger(path: Path, ledger: dict[str, Held]) -> None:
    write_text(path, json.dumps({key: asdict(held) for key, held in sorted(ledger.items())}, indent=1) + "\n")


def _send(wandb, settings: WandbSettings, run: TrackerRun, identifier: str, held: Held, points, summary: bool) -> None:
    tracker = wandb.init(
        project=settings.project, entity=settings.entity, group=settings.group or run.run, name=run.name,
        id=identifier, resume="allow", mode=settings.mode, dir=str(settings.dir), job_type="eval",
        config={"run": run.run, "method": run.method, "window": run.window},
        settings=wandb.Settings(console="off", save_code=False, x_disable_stats=True, silent=True))
    try:
        tracker.define_metric(STEP_METRIC)
        tracker.define_metric(f"{PREFIX}*", step_metric=STEP_METRIC)
        for row, point in enumerate(points, start=held.rows):
            tracker.log({STEP_METRIC: point.step, **point.metrics}, step=row)
        if summary:
            for table in run.tables:
                tracker.summary[f"tables/{table.name}"] = wandb.Table(columns=list(table.columns),
                                                                      data=[list(row) for row in table.rows])
            if run.report is not None:
                artifact = wandb.Artifact(REPORT_ARTIFACT, type="report")
                artifact.add_file(str(run.report))
                tracker.log_artifact(artifact)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()


def export(runs: list[TrackerRun], settings: WandbSettings) -> list[Exported]:
    try:
        import wandb
    except ImportError as error:
        raise missing_library(TRACKER, error) from None
    settings.dir.mkdir(parents=True, exist_ok=True)
    ledger_path = settings.dir / LEDGER
    ledger = _read_ledger(ledger_path)
    exported = []
    for run in runs:
        identifier = run_id(settings, run)
        held = ledger.get(identifier, Held())
        points, refused = run.points_after(set(held.steps))
        warn_refused(TRACKER, run.name, refused)
        summary = held.summary != run.summary_digest
        if points or summary:
            try:
                _send(wandb, settings, run, identifier, held, points, summary)
            except wandb.errors.Error as error:
                raise TrackerError(f"W&B: {run.name}: {error}") from error
            ledger[identifier] = Held(held.steps + [point.step for point in points], held.rows + len(points),
                                      run.summary_digest)
            _write_ledger(ledger_path, ledger)  # after each run: a later failure keeps what W&B has taken
        exported.append(Exported(run.name, identifier, tuple(point.step for point in points), tuple(refused), summary))
    return exported
