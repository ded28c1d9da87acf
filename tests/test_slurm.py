"""The workflow on a real Slurm cluster with profiles/slurm: every job goes through sbatch, and the results
equal those of a local run.

The cluster is a single node on localhost, started (and installed with apt-get where missing) by
tests/slurm/start-local-slurm.sh, which needs root: the tests call it through `sudo -n` when not root.
"""

import os
import re
import subprocess

import pandas as pd
import pytest
import yaml

from helpers import ROOT, small_config, snakemake

pytestmark = pytest.mark.slurm

SCRIPTS = ROOT / "tests" / "slurm"


def as_root(script):
    command = ["bash", str(SCRIPTS / script)]
    return subprocess.run(command if os.geteuid() == 0 else ["sudo", "-n", *command], capture_output=True, text=True)


@pytest.fixture(scope="session")
def local_slurm():
    """A running single-node cluster; stopped at the end unless it was running before."""
    already_running = os.path.exists("/run/local-slurm/slurmctld.pid")
    started = as_root("start-local-slurm.sh")
    assert started.returncode == 0, started.stdout + started.stderr
    yield
    if not already_running:
        stopped = as_root("stop-local-slurm.sh")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


@pytest.fixture(scope="module")
def config(tiny_demo):
    """The small config without ensembles: averages (grouped with their evaluation), raw evaluations and the
    reductions cover every kind of job."""
    return {**small_config(tiny_demo / "checkpoints", tiny_demo / "tasks"), "methods": ["avg"]}


def run(workdir, config, *options):
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, *options)
    assert result.returncode == 0, result.stderr[-5000:]
    return result.stderr


@pytest.fixture(scope="module")
def local_run(config, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("local")
    run(workdir, config)
    return workdir


@pytest.fixture(scope="module")
def slurm_run(local_slurm, config, tmp_path_factory):
    """The same config with profiles/slurm; its directory and its log. The node has no GPU and 2 CPUs, and
    the tests want it quick: inference asks for no GPU and less memory, status checks start after 5 s."""
    workdir = tmp_path_factory.mktemp("slurm")
    log = run(workdir, config, "--profile", str(ROOT / "profiles" / "slurm"),
              "--set-resources", "evaluate:gpu=0", "evaluate:mem_mb=2000",
              "--slurm-init-seconds-before-status-checks", "5")
    return workdir, log


def sacct(workdir):
    """JobID -> (State, Comment) of the cluster's jobs that ran in ``workdir``."""
    result = subprocess.run(["sacct", "--allocations", "--parsable2", "--noheader", "--starttime", "now-1days",
                             "--format", "JobID,State,WorkDir,Comment"], capture_output=True, text=True, check=True)
    rows = [line.split("|") for line in result.stdout.splitlines()]
    return {job: (state, comment) for job, state, directory, comment in rows if directory == str(workdir)}


def test_every_job_went_through_sbatch(slurm_run):
    workdir, log = slurm_run
    # the plugin logs every submission with its Slurm log, which lives under logs/slurm (profile: slurm-logdir)
    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+)\)", log)
    assert all(path.startswith(f"{workdir}/logs/slurm/") for _, path in submitted)
    jobs = sacct(workdir)
    assert set(jobs) == {job for job, _ in submitted}
    assert {state for state, _ in jobs.values()} == {"COMPLETED"}
    # one Slurm job per raw evaluation (4 steps), per average and its evaluation (windows of 2 end at 3
    # steps), and per reduction (scores, stability, pick, indicators, report); plan and settings run locally
    comments = sorted(comment for _, comment in jobs.values())
    assert comments == sorted(["rule_average_and_evaluate_evaluate"] * 4
                              + ["rule_average_and_evaluate_average_evaluate"] * 3
                              + ["rule_scores", "rule_stability", "rule_pick", "rule_weights", "rule_indicators",
                                 "rule_report"])


def test_the_results_equal_a_local_run(slurm_run, local_run):
    workdir, _ = slurm_run
    keys = ["run", "task", "method", "window", "step"]
    on_slurm, local = (pd.read_parquet(d / "results" / "scores.parquet").sort_values(keys, ignore_index=True)
                       for d in (workdir, local_run))
    pd.testing.assert_frame_equal(on_slurm, local)
    pd.testing.assert_frame_equal(pd.read_csv(workdir / "results" / "tables" / "stability.csv"),
                                  pd.read_csv(local_run / "results" / "tables" / "stability.csv"))
    assert (workdir / "results" / "report" / "report.html").is_file()


def test_packed_models_share_one_engine_per_slurm_job(local_slurm, config, local_run, tmp_path):
    """The 7 models (4 raw, 3 averaged) packed 4 per Slurm job (--group-components): 2 jobs, each evaluating
    its models one after the other through one engine, and the same predictions as the local run (the
    reductions are left out: the other tests run them on Slurm)."""
    workdir = tmp_path / "packed"
    workdir.mkdir()
    log = run(workdir, config, "--profile", str(ROOT / "profiles" / "slurm"), "--until", "evaluate",
              "--group-components", "average_and_evaluate=4", "--set-resources", "evaluate:gpu=0",
              "evaluate:mem_mb=2000", "--slurm-init-seconds-before-status-checks", "5")
    packed = [job for job, (_, comment) in sacct(workdir).items() if comment.startswith("rule_average_and_evaluate")]
    assert len(packed) == 2, log[-3000:]
    job_logs = [path.read_text() for path in (workdir / "logs" / "evaluate").rglob("*.log")]
    assert len(job_logs) == 7
    assert sum(text.count("started evaluation engine") for text in job_logs) == 2
    assert sum("swapped in" in text for text in job_logs) == 5
    local = sorted((local_run / "results" / "predictions").rglob("*.parquet"))
    assert len(local) == 7 * 3
    for path in local:
        columns = ["example_id", "prediction", "score", "choice_logprobs"]
        packed_table = pd.read_parquet(workdir / path.relative_to(local_run), columns=columns)
        pd.testing.assert_frame_equal(packed_table, pd.read_parquet(path, columns=columns))
