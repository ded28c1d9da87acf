"""The export to experiment trackers, run by snakemake on the tiny demo with TensorBoard, W&B (offline) and
MLflow (SQLite) configured, and read back with each tracker's own reader: TensorBoard's EventAccumulator,
MLflow's MlflowClient, and W&B's offline run files decoded with W&B's protobuf schema."""

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ckpt_stability.cli import main
from ckpt_stability.export.records import Point, Results, TrackerRun, read_tracker_runs
from ckpt_stability.export.settings import MlflowSettings, TensorBoardSettings, WandbSettings
from ckpt_stability.plan import Plan
from helpers import ROOT, cli, cli_command, small_config, snakemake
from test_workflow import file_states

EXPORT = {
    "tensorboard": {"logdir": "tb"},
    "wandb": {"project": "ckpt-test", "mode": "offline", "dir": "wandb"},
    "mlflow": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "ckpt-test"},
}
SERIES = [("raw", 1), ("vote", 2)]


def export_command(tracker: str) -> list[str]:
    """The command of the workflow's export job for ``tracker``: its settings in EXPORT as options."""
    options = [part for key, value in EXPORT[tracker].items() for part in (f"--{key.replace('_', '-')}", value)]
    return cli_command("export", tracker, *options, "--receipt", f"results/export/{tracker}.json")


@pytest.fixture(scope="module")
def workdir(tiny_demo, tmp_path_factory):
    """The workflow run once with the three trackers configured, over a copy of the tiny demo's checkpoints
    (10 to 40; the last test adds one); raw and vote over windows 1 and 2, two tasks in two categories, and
    the raw checkpoints' perplexity."""
    workdir = tmp_path_factory.mktemp("export")
    shutil.copytree(tiny_demo / "checkpoints", workdir / "checkpoints")
    config = small_config(workdir / "checkpoints", tiny_demo / "tasks")
    del config["tasks"]["demo_arith"]  # two choice tasks: no generation to wait for
    config.update(methods=["vote"], perplexity_text=str(tiny_demo / "heldout.txt"), export=EXPORT)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def expected_metrics(workdir: Path) -> dict[tuple[str, int], dict[int, dict[str, float]]]:
    """(method, window) -> step -> metric -> value, computed here from scores.parquet and the perplexity files:
    the tasks, their categories' means, the mean of the categories, and perplexity for the evaluated models."""
    scores = pd.read_parquet(workdir / "results" / "scores.parquet")
    expected = {}
    for (method, window), series in scores.groupby(["method", "window"]):
        per_step = {}
        for step, rows in series.groupby("step"):
            categories = rows.groupby("category")["score"].mean()
            metrics = {f"eval/{task}": score for task, score in zip(rows["task"], rows["score"])}
            metrics |= {f"eval/{category}": score for category, score in categories.items()}
            metrics["eval/overall"] = categories.mean()
            perplexity = workdir / "results" / "perplexity" / "tiny" / f"{method}{window}" / f"step{step}.json"
            if perplexity.is_file():
                metrics["eval/perplexity"] = json.loads(perplexity.read_text())["perplexity"]
            per_step[int(step)] = metrics
        expected[method, int(window)] = per_step
    return expected


# ---------------------------------------------------------------- the trackers' own readers


def tensorboard_scalars(workdir: Path) -> dict[tuple[str, int], dict[str, list[tuple[int, float]]]]:
    """(method, window) -> tag -> [(step, value)], with TensorBoard's EventAccumulator, keeping every event."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = {}
    for method, window in SERIES:
        accumulator = EventAccumulator(str(workdir / "tb" / "tiny" / f"{method}{window}"),
                                       size_guidance={"scalars": 0, "tensors": 0})
        accumulator.Reload()
        result[method, window] = {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
                                  for tag in accumulator.Tags()["scalars"]}
        result[method, window]["texts"] = accumulator.Tags()["tensors"]
    return result


def mlflow_histories(workdir: Path) -> dict[tuple[str, int], dict[str, list[tuple[int, float]]]]:
    """(method, window) -> metric -> [(step, value)], with MlflowClient on the SQLite store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPORT["mlflow"]["experiment"])
    result = {}
    for run in client.search_runs([experiment.experiment_id]):
        key = run.data.tags["method"], int(run.data.tags["window"])
        assert key not in result, f"two MLflow runs for {key}"
        result[key] = {name: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
                       for name in run.data.metrics}
        result[key]["artifacts"] = sorted(a.path for a in client.list_artifacts(run.info.run_id, "tables"))
    return result


def wandb_records(path: Path):
    """The records of a W&B run file (``run-<id>.wandb``), decoded with W&B's protobuf schema. The framing is
    that of wandb's writer (wandb/sdk/internal/datastore.py, and wandb-core's store since 0.18): a 7-byte
    header (":W&B", 0xBEE1, version 0), then LevelDB's log format, blocks of 32 KiB of records (CRC-32 of the
    type byte and the data, little-endian u16 length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    position, pieces = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's last bytes, too few for a header, are zero padding
            position += 32768 - position % 32768
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        piece = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0:
            break
        assert checksum == zlib.crc32(piece, zlib.crc32(bytes([kind]))), f"{path}: corrupt record at {position}"
        pieces += piece
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def wandb_runs(workdir: Path) -> dict[tuple[str, int], list[list]]:
    """(method, window) -> the records of each offline run directory of its W&B run id, oldest first."""
    runs = {}
    for method, window in SERIES:
        directories = sorted((workdir / "wandb" / "wandb").glob(f"offline-run-*-tiny-{method}{window}"))
        runs[method, window] = [list(wandb_records(directory / f"run-tiny-{method}{window}.wandb"))
                                for directory in directories]
    return runs


def history(records) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in records if record.WhichOneof("record_type") == "history"]


# ---------------------------------------------------------------- tests


def test_the_schema_fills_each_tracker_s_defaults_and_names_a_wrong_key():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    schema = str(ROOT / "workflow" / "schemas" / "config.schema.yaml")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["export"] = {"tensorboard": {}, "wandb": {"project": "p"}, "mlflow": {}}
    validate(config, schema)
    assert config["export"] == {  # the command's defaults
        "tensorboard": {"logdir": str(TensorBoardSettings.logdir)},
        "wandb": {"project": "p", "mode": WandbSettings.mode, "dir": str(WandbSettings.dir)},
        "mlflow": {"tracking_uri": MlflowSettings.tracking_uri, "experiment": MlflowSettings.experiment}}
    for wrong, message in [({"wandb": {"project": "p", "mode": "onlin"}}, "'onlin' is not one of"),
                           ({"wandb": {}}, "'project' is a required property"),
                           ({"comet": {}}, "'comet' was unexpected")]:
        config["export"] = wrong
        with pytest.raises(WorkflowError, match=message):
            validate(config, schema)



def test_tensorboard_holds_every_metric_at_its_step(workdir):
    expected, scalars = expected_metrics(workdir), tensorboard_scalars(workdir)
    for series, steps in expected.items():
        tags = scalars[series]
        assert {f"tables/{name}/text_summary" for name in ("stability", "pick")} <= set(tags.pop("texts"))
        assert set(tags) == {metric for metrics in steps.values() for metric in metrics}
        for tag, events in tags.items():
            assert events == [(step, pytest.approx(metrics[tag], rel=1e-6)) for step, metrics in steps.items()
                              if tag in metrics]
    models_times_levels = sum(len(metrics) for steps in expected.values() for metrics in steps.values())
    assert sum(len(events) for tags in scalars.values() for events in tags.values()) == models_times_levels
    assert models_times_levels == 4 * 6 + 3 * 5  # raw: 4 steps, 2 tasks, 2 categories, overall, perplexity


def test_mlflow_holds_every_metric_at_its_step(workdir):
    expected, histories = expected_metrics(workdir), mlflow_histories(workdir)
    assert set(histories) == set(expected)
    for series, steps in expected.items():
        tables = ["pick", "stability"] if series == ("raw", 1) else ["improvement", "pick", "stability"]
        assert histories[series].pop("artifacts") == [f"tables/{name}.csv" for name in tables]
        for metric, points in histories[series].items():
            assert points == [(step, pytest.approx(metrics[metric])) for step, metrics in steps.items()
                              if metric in metrics]


def test_wandb_offline_runs_plot_eval_against_the_training_step(workdir):
    expected, runs = expected_metrics(workdir), wandb_runs(workdir)
    for series, steps in expected.items():
        (records,) = runs[series]  # one offline run so far
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert (run.run_id, run.run_group, run.display_name, run.project) == (
            f"tiny-{series[0]}{series[1]}", "tiny", f"tiny {series[0]}{series[1]}", "ckpt-test")
        metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
        assert any(m.glob_name == "eval/*" and m.step_metric == "train/step" for m in metrics)
        rows = history(records)
        assert [row["train/step"] for row in rows] == sorted(steps)  # ascending, each step once
        assert [row["_step"] for row in rows] == list(range(len(steps)))
        for row in rows:
            wanted = steps[row["train/step"]]
            assert {key: value for key, value in row.items() if key.startswith("eval/")} == pytest.approx(wanted)
        summary_keys = {item.key for r in records if r.WhichOneof("record_type") == "summary"
                        for item in r.summary.update}
        assert {"tables/stability", "tables/pick"} <= summary_keys
        assert any(r.WhichOneof("record_type") == "artifact" and r.artifact.type == "report" for r in records)


def test_a_second_export_adds_nothing(workdir):
    before = (tensorboard_scalars(workdir), mlflow_histories(workdir), wandb_runs(workdir),
              sorted(p.name for p in (workdir / "tb").rglob("events.*")))
    # the workflow's export jobs' commands, all three at once
    exports = [subprocess.Popen(export_command(tracker), cwd=workdir, stderr=subprocess.PIPE, text=True)
               for tracker in EXPORT]
    for export in exports:
        errors = export.communicate(timeout=120)[1]
        assert export.returncode == 0, errors[-3000:]
    after = (tensorboard_scalars(workdir), mlflow_histories(workdir), wandb_runs(workdir),
             sorted(p.name for p in (workdir / "tb").rglob("events.*")))
    assert after == before
    receipt = json.loads((workdir / "results" / "export" / "mlflow.json").read_text())
    assert [entry["steps"] for entry in receipt["runs"]] == [[], []]


def test_tracker_runs_follow_the_registrys_order_with_configured_averaging_methods(tmp_path):
    """Raw first, then the methods in the plan's registry order (avg, the configured averaging methods, vote),
    each by window; a configured averaging method is a model, so its perplexity is read as avg's is."""
    plan = Plan(runs={"r": [10, 20, 30]}, windows=[1, 2, 3], methods=["avg", "ema", "vote"],
                tasks={"t": {"category": "C", "mode": "choice"}}, averaging={"ema": {"scheme": "ema", "half_life": 10}})
    (tmp_path / "plan.json").write_text(json.dumps(dataclasses.asdict(plan)))
    series = [(method, window, step) for method, window, steps, _ in plan.series("r") for step in steps]
    scores = pd.DataFrame([("r", "t", "C", method, window, step, 0.5) for method, window, step in reversed(series)],
                          columns=["run", "task", "category", "method", "window", "step", "score"])
    scores.to_parquet(tmp_path / "scores.parquet")
    (tmp_path / "tables").mkdir()
    for name in ("stability", "improvement", "pick"):
        (tmp_path / "tables" / f"{name}.csv").write_text("run,method,window\n")
    perplexity = tmp_path / "perplexity" / "r" / "ema3" / "step30.json"
    perplexity.parent.mkdir(parents=True)
    perplexity.write_text(json.dumps({"perplexity": 1.5}))
    runs = read_tracker_runs(Results(tmp_path / "scores.parquet", tmp_path / "tables", tmp_path / "plan.json",
                                     perplexity=tmp_path / "perplexity"))
    assert [run.series for run in runs] == ["raw1", "avg2", "avg3", "ema2", "ema3", "vote2", "vote3"]
    assert runs[4].points[-1].metrics == {"eval/t": 0.5, "eval/C": 0.5, "eval/overall": 0.5, "eval/perplexity": 1.5}


def test_refused_steps_a_tracker_whose_steps_only_go_forward_cannot_take():
    run = TrackerRun("r", "raw", 1, tuple(Point(step, {"eval/overall": 0.5}) for step in (10, 20, 30, 40)), (), None)
    new, refused = run.points_after({10, 30})
    assert [point.step for point in new] == [40]
    assert refused == [20]
    assert [point.step for point in run.points_after(set())[0]] == [10, 20, 30, 40]


def test_finetuned_targets_are_a_metric_at_the_fine_tuned_steps(workdir, tmp_path):
    targets = tmp_path / "targets.csv"
    pd.DataFrame({"run": ["tiny", "tiny"], "step": [20, 40], "method": ["raw", "raw"], "window": [1, 1],
                  "target": [0.25, None]}).to_csv(targets, index=False)
    results = workdir / "results"
    runs = read_tracker_runs(Results(results / "scores.parquet", results / "tables", results / "plan.json",
                                     targets=targets))
    raw = next(run for run in runs if run.series == "raw1")
    assert {point.step: point.metrics.get("eval/finetuned") for point in raw.points} == {
        10: None, 20: 0.25, 30: None, 40: None}  # an empty target (not fine-tuned after all) is no point


def test_a_missing_tracker_library_names_the_extra(workdir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    monkeypatch.chdir(workdir)
    assert main(["export", "wandb", "--project", "p", "--dir", "elsewhere"]) == 2
    assert 'needs wandb, which is not installed: pip install -e ".[trackers]"' in capsys.readouterr().err


def test_an_unreachable_tracker_fails_the_export_and_touches_no_result(workdir):
    before = file_states(workdir / "results")
    result = cli("export", "mlflow", "--tracking-uri", "http://127.0.0.1:9", "--receipt", "results/export/x.json",
                 cwd=workdir, env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    assert result.returncode == 1
    assert "ckpt-stability export: error: MLflow (http://127.0.0.1:9): " in result.stderr
    assert "Connection refused" in result.stderr  # MLflow's own message
    assert file_states(workdir / "results") == before


def test_a_new_checkpoint_adds_its_steps_only(workdir):
    before = (tensorboard_scalars(workdir), mlflow_histories(workdir), wandb_runs(workdir))
    shutil.copytree(workdir / "checkpoints" / "checkpoint-40", workdir / "checkpoints" / "checkpoint-50")
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = expected_metrics(workdir)
    after = (tensorboard_scalars(workdir), mlflow_histories(workdir), wandb_runs(workdir))
    for series, steps in expected.items():
        new = steps[50]
        for tracker in (0, 1):  # TensorBoard, MLflow: the old points as they were, then step 50's
            for metric, points in after[tracker][series].items():
                if metric.startswith("eval/"):
                    assert points == before[tracker][series][metric] + [(50, pytest.approx(new[metric], rel=1e-6))]
        # W&B: a second offline run of the same id holds step 50 alone, as the next row
        first, second = after[2][series]
        assert first == before[2][series][0]
        (row,) = history(second)
        assert (row["train/step"], row["_step"]) == (50, len(steps) - 1)
