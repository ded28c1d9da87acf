"""The whole workflow, run by snakemake on real tiny checkpoints and real task files."""

import hashlib
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from ckpt_stability.predictions import read_predictions
from helpers import JGLUE, small_config, snakemake


def file_states(*roots: Path) -> dict[Path, tuple[int, str | None]]:
    """Every file and directory under ``roots``: its mtime (in ns) and, for a file, the SHA-256 of its bytes.
    A directory's mtime changes when an entry is created, renamed or removed in it, even a temporary one."""
    return {path: (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None)
            for root in roots for path in [root, *root.rglob("*")]}


@pytest.fixture(scope="module")
def inputs_before_the_run(tiny_demo) -> dict:
    """The state of the run's inputs: the tiny demo's checkpoints and tasks, and the JGLUE task files."""
    return file_states(tiny_demo, JGLUE)


@pytest.fixture(scope="module")
def finished_run(tiny_demo, tmp_path_factory, inputs_before_the_run):  # the inputs' state is taken first
    workdir = tmp_path_factory.mktemp("workflow")
    (workdir / "config.yaml").write_text(yaml.safe_dump(small_config(tiny_demo / "checkpoints", tiny_demo / "tasks")))
    result = snakemake(workdir)
    assert result.returncode == 0, result.stdout[-3000:]
    return workdir


def test_inputs_are_only_read(finished_run, tiny_demo, inputs_before_the_run):
    assert file_states(tiny_demo, JGLUE) == inputs_before_the_run


def test_outputs_follow_the_contract(finished_run):
    predictions = finished_run / "results" / "predictions" / "tiny"
    for step in (10, 20, 30, 40):
        for task in ("demo_colors", "demo_arith", "jnli"):
            assert (predictions / "raw1" / f"step{step}" / f"{task}.parquet").is_file()
    for step in (20, 30, 40):
        for method in ("avg2", "vote2"):
            assert {p.name for p in (predictions / method / f"step{step}").iterdir()} == {
                "demo_colors.parquet", "demo_arith.parquet", "jnli.parquet"}
        assert {p.name for p in (predictions / "prob2" / f"step{step}").iterdir()} == {
            "demo_colors.parquet", "jnli.parquet"}
    assert not (predictions / "avg2" / "step10").exists()  # no window of 2 ends at the first checkpoint
    # averaged weights are temporary by default
    assert not any((finished_run / "results" / "averaged").rglob("*.safetensors"))
    jnli = read_predictions(predictions / "avg2" / "step30" / "jnli.parquet")
    assert len(jnli.prediction) == 8 and jnli.provenance["members"] == [20, 30]
    assert jnli.provenance["model_path"] == "results/averaged/tiny/avg2/step30"


def test_scores_and_tables(finished_run):
    scores = pd.read_parquet(finished_run / "results" / "scores.parquet")
    assert list(scores.columns) == ["run", "task", "category", "method", "window", "step", "metric", "score",
                                    "n_examples", "excluded", "effective_step"]
    assert set(zip(scores.task, scores.metric)) == {("demo_colors", "exact_match"), ("demo_arith", "exact_match"),
                                                    ("jnli", "exact_match")}
    # raw: 4 steps x 3 tasks; avg and vote: 3 steps x 3 tasks; prob: 3 steps x 2 choice tasks
    assert len(scores) == 12 + 9 + 9 + 6
    vote = read_predictions(finished_run / "results/predictions/tiny/vote2/step40/demo_colors.parquet")
    row = scores[(scores.method == "vote") & (scores.step == 40) & (scores.task == "demo_colors")]
    assert row.score.item() == pytest.approx(vote.score.mean())
    stability = pd.read_csv(finished_run / "results" / "tables" / "stability.csv")
    assert set(stability.level) == {"task", "category", "overall"}
    assert set(zip(stability.method, stability.window)) == {("raw", 1), ("avg", 2), ("vote", 2), ("prob", 2)}
    # ceil(0.5 * 4) = 2 steps, raised to the minimum of 3: steps 20, 30, 40
    assert set(stability.segment_start) == {20} and set(stability.segment_end) == {40}
    improvement = pd.read_csv(finished_run / "results" / "tables" / "improvement.csv")
    assert set(improvement.method) == {"avg", "vote", "prob"}
    assert (finished_run / "results" / "tables" / "stability.md").read_text().startswith("| run")


def test_pick(finished_run):
    """pick.csv has a row for every run, method, window and level; the recommended step's score is the highest
    of its group, every interval holds its score, and the set holds the recommended checkpoint."""
    tables = finished_run / "results" / "tables"
    pick = pd.read_csv(tables / "pick.csv", dtype={"set_steps": str})
    stability = pd.read_csv(tables / "stability.csv")
    keys = ["run", "method", "window", "level", "name"]
    assert sorted(map(tuple, pick[keys].to_numpy())) == sorted(map(tuple, stability[keys].to_numpy()))
    checkpoints = pd.read_parquet(tables / "pick_checkpoints.parquet")
    for key, group in checkpoints.groupby(keys):
        row = pick.set_index(keys).loc[key]
        assert row.score == group.score.max()
        assert group[group.recommended].step.item() == row.recommended_step
        assert (group.ci_low <= group.score + 1e-12).all() and (group.score <= group.ci_high + 1e-12).all()
        assert [int(step) for step in row.set_steps.split()] == group[group.in_set].step.tolist()
        assert row.recommended_step in group[group.in_set].step.tolist()
        assert row.range_size == len(group) == (4 if key[1] == "raw" else 3)
    raw_task = pick[(pick.method == "raw") & (pick.level == "task")]
    assert set(raw_task.interval) == {"wilson"}  # the tasks' scores are 0/1
    assert (tables / "pick.md").read_text().startswith("| run")


def test_provenance_is_in_every_file(finished_run):
    for path in (finished_run / "results" / "predictions").rglob("*.parquet"):
        metadata = pq.read_schema(path).metadata
        assert b"ckpt_stability" in metadata, path


def test_a_second_invocation_has_nothing_to_do(finished_run):
    result = snakemake(finished_run, "--dry-run", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr


def test_stability_reads_only_prediction_files_that_scores_declares(finished_run, monkeypatch):
    """The stability rule reads prediction files without declaring them (see workflow/rules/stability.smk):
    safe only while each is an input of scores, on which stability depends."""
    from ckpt_stability import stability

    summary = snakemake(finished_run, "--detailed-summary")
    assert summary.returncode == 0, summary.stderr
    rows = [line.split("\t") for line in summary.stdout.splitlines()]
    header = rows[0]
    (scores_row,) = [row for row in rows if row[0] == "results/scores.parquet"]
    declared = set(scores_row[header.index("input-file(s)")].split(","))
    read = []
    for name in ("read_table", "read_provenance"):
        original = getattr(stability, name)
        monkeypatch.setattr(stability, name, lambda path, *args, _original=original, **kwargs:
                            (read.append(os.path.relpath(path, finished_run)), _original(path, *args, **kwargs))[1])
    monkeypatch.chdir(finished_run)
    stability.write_tables(Path("results/plan.json"), Path("results/scores.parquet"), finished_run / "again")
    assert read and set(read) <= declared
