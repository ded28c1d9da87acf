"""The results as MLflow runs: one run per tracker run in the experiment, found again by its tags.

MLflow's rules (mlflow/store/tracking/sqlalchemy_store.py, MLflow 3): a metric is an append-only history of
(value, timestamp, step) points, and logging a point again adds a second one at the same step; the file
store is refused by recent versions, so the default store is a SQLite database. Each export therefore reads
every metric's history of the run and logs only the (metric, step) points it lacks, so that re-exporting
the same results adds nothing, and a checkpoint that lands late is added at its step (MLflow's histories
need no order). The tables go as CSV artifacts (``tables/<name>.csv``, replaced when sent again: MLflow's
``log_table`` would append to the one sent before) and the report as an artifact, when their digest, kept in
a tag, changed.
"""

from __future__ import annotations

import time
from pathlib import Path

from ckpt_stability.export import Exported, TrackerError, missing_library
from ckpt_stability.export.records import TrackerRun
from ckpt_stability.export.settings import MlflowSettings

TRACKER = "MLflow"
SERIES_TAG = "ckpt_stability.series"
"""run/method+window: finds the MLflow run of a tracker run again"""
SUMMARY_TAG = "ckpt_stability.summary_digest"
BATCH = 1000
"""MLflow's limit on the metrics of one log_batch"""
SQLITE = "sqlite:///"


def _artifact_location(tracking_uri: str) -> str | None:
    """Beside a SQLite database, the artifacts of a new experiment (MLflow's default is the working
    directory's ./mlartifacts); a tracking server keeps its own."""
    if not tracking_uri.startswith(SQLITE):
        return None
    return (Path(tracking_uri.removeprefix(SQLITE)).parent.resolve() / "mlartifacts").as_uri()


def _experiment_id(client, settings: MlflowSettings) -> str:
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(settings.experiment, artifact_location=_artifact_location(settings.tracking_uri))


def _run_id(client, experiment_id: str, run: TrackerRun) -> str:
    series = f"{run.run}/{run.series}"
    found = client.search_runs([experiment_id], filter_string=f"tags.`{SERIES_TAG}` = '{series}'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = {SERIES_TAG: series, "run": run.run, "method": run.method, "window": str(run.window)}
    return client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id


def _export_run(client, Metric, experiment_id: str, run: TrackerRun) -> Exported:
    identifier = _run_id(client, experiment_id, run)
    names = sorted({name for point in run.points for name in point.metrics})
    held = {(name, entry.step) for name in names for entry in client.get_metric_history(identifier, name)}
    now = int(time.time() * 1000)
    metrics = [Metric(name, value, now, point.step) for point in run.points for name, value in point.metrics.items()
               if (name, point.step) not in held]
    for start in range(0, len(metrics), BATCH):
        client.log_batch(identifier, metrics=metrics[start:start + BATCH])
    summary = client.get_run(identifier).data.tags.get(SUMMARY_TAG) != run.summary_digest
    if summary:
        for table in run.tables:  # not log_table, which appends to a table sent before
            client.log_text(identifier, table.frame().to_csv(index=False), f"tables/{table.name}.csv")
        if run.report is not None:
            client.log_artifact(identifier, str(run.report), "report")
        client.set_tag(identifier, SUMMARY_TAG, run.summary_digest)
    if metrics or summary:
        client.set_terminated(identifier)
    return Exported(run.name, identifier, tuple(sorted({metric.step for metric in metrics})), (), summary)


def export(runs: list[TrackerRun], settings: MlflowSettings) -> list[Exported]:
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException
    except ImportError as error:
        raise missing_library(TRACKER, error) from None
    if settings.tracking_uri.startswith(SQLITE):  # SQLite creates the database, not its folder
        Path(settings.tracking_uri.removeprefix(SQLITE)).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    try:
        experiment_id = _experiment_id(client, settings)
        return [_export_run(client, Metric, experiment_id, run) for run in runs]
    except MlflowException as error:
        raise TrackerError(f"MLflow ({settings.tracking_uri}): {error.message}") from error
