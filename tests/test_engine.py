"""The evaluation engine: one process keeps a model loaded across jobs and swaps weights in place, with
the same results as a cold process per model; it is private, ends when idle or with its workflow, and its
crash fails only the job in flight."""

import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from ckpt_stability.backends.base import WeightsNotSwappable
from ckpt_stability.backends.transformers import TransformersBackend
from ckpt_stability.engine import _Relay, slot_name, take_slot
from ckpt_stability.predictions import read_predictions
from helpers import alive, cli, cli_command, ended, engine_pids, kill_engine_during, small_config, snakemake

TASKS = ("demo_colors", "demo_arith")


def evaluate_args(model, output, demo, *extra):
    return ["evaluate", "--model", model, "--output-dir", output, "--threads", "1", "--num-fewshot", "2",
            *[arg for task in TASKS for arg in ("--task", demo / "tasks" / f"{task}.json")],
            "--perplexity-text", demo / "heldout.txt", "--perplexity-output", f"{output}.json", *extra]


def engine_args(idle_timeout=600):
    """Long enough that no engine ends by itself during a test on a busy machine; each test stops its own."""
    return ["--engine", "--engine-idle-timeout", str(idle_timeout)]


@pytest.fixture
def workdir(tmp_path):
    """The working directory of a test's jobs: its engines are stopped at the end, whatever happened."""
    yield tmp_path
    cli("engine", "stop", cwd=tmp_path)


def assert_same_results(first: Path, second: Path):
    """The prediction files and the perplexity of two evaluations hold bitwise the same values."""
    for task in TASKS:
        a, b = read_predictions(first / f"{task}.parquet"), read_predictions(second / f"{task}.parquet")
        assert a.prediction == b.prediction
        np.testing.assert_array_equal(a.score, b.score)
        if a.choice_logprobs is not None:
            assert np.array_equal(np.asarray(a.choice_logprobs), np.asarray(b.choice_logprobs))
    nll = [json.loads(Path(f"{directory}.json").read_text())["nll"] for directory in (first, second)]
    assert nll[0] == nll[1]


@pytest.fixture(scope="module")
def models(tiny_demo, tmp_path_factory) -> list[Path]:
    """Raw and averaged models of one run, in an order that swaps both ways."""
    checkpoints = tiny_demo / "checkpoints"
    averaged = tmp_path_factory.mktemp("averaged") / "avg2-step40"
    result = cli("average", "--output", averaged, checkpoints / "checkpoint-30", checkpoints / "checkpoint-40")
    assert result.returncode == 0, result.stderr
    return [checkpoints / "checkpoint-10", averaged, checkpoints / "checkpoint-20", checkpoints / "checkpoint-40"]


def test_a_swapped_engine_gives_bitwise_the_results_of_a_cold_process(models, tiny_demo, tiny_model_dir, workdir):
    # the last model has another architecture and tokenizer: the engine builds it anew
    sequence = [*models, tiny_model_dir]
    logs = []
    for number, model in enumerate(sequence):
        cold = cli(*evaluate_args(model, workdir / f"cold{number}", tiny_demo), cwd=workdir)
        assert cold.returncode == 0, cold.stderr
        warm = cli(*evaluate_args(model, workdir / f"engine{number}", tiny_demo), *engine_args(), cwd=workdir)
        assert warm.returncode == 0, warm.stderr
        logs.append(warm.stderr)
        assert_same_results(workdir / f"cold{number}", workdir / f"engine{number}")
    assert len(engine_pids("".join(logs))) == 1
    assert "loaded with the transformers backend" in logs[0]
    assert all("swapped in" in log for log in logs[1:4]), logs
    assert "loaded with the transformers backend" in logs[4] and "swapped in" not in logs[4]
    # each job's log holds its own model's lines
    assert all(f"{sequence[n]}" in log and "demo_colors: exact_match" in log for n, log in enumerate(logs))


def test_a_swap_sets_every_weight_and_refuses_a_checkpoint_missing_one(models, tmp_path):
    backend = TransformersBackend(str(models[0]), threads=1)
    backend.swap_weights(str(models[1]))
    fresh = TransformersBackend(str(models[1]), threads=1)
    swapped_state, fresh_state = backend.model.state_dict(), fresh.model.state_dict()
    assert swapped_state.keys() == fresh_state.keys()
    assert all(torch.equal(swapped_state[name], fresh_state[name]) for name in fresh_state)

    # a checkpoint that lacks a layer: a fresh load would initialise it, a swap would keep the old one
    lacking = tmp_path / "lacking"
    lacking.mkdir()
    for path in models[2].iterdir():
        if path.name != "model.safetensors":
            (lacking / path.name).write_bytes(path.read_bytes())
    tensors = load_file(models[2] / "model.safetensors")
    missing = next(name for name in tensors if "layers.1.mlp" in name)
    save_file({name: tensor for name, tensor in tensors.items() if name != missing}, lacking / "model.safetensors",
              metadata={"format": "pt"})
    before = {name: tensor.clone() for name, tensor in backend.model.state_dict().items()}
    with pytest.raises(WeightsNotSwappable, match=re.escape(missing)):
        backend.swap_weights(str(lacking))
    assert all(torch.equal(before[name], tensor) for name, tensor in backend.model.state_dict().items())


def test_a_killed_engine_fails_only_the_job_in_flight(models, tiny_demo, workdir):
    first = cli(*evaluate_args(models[0], workdir / "first", tiny_demo), *engine_args(), cwd=workdir)
    assert first.returncode == 0, first.stderr
    (pid,) = engine_pids(first.stderr)
    long_text = workdir / "long.txt"  # a job that lasts long enough to be killed in the middle
    long_text.write_text((tiny_demo / "heldout.txt").read_text() * 40)
    args = evaluate_args(models[1], workdir / "second", tiny_demo)
    args[args.index("--perplexity-text") + 1] = long_text
    code, log = kill_engine_during(pid, cli_command(*args, *engine_args()), workdir)
    assert code == 1 and "ended while evaluating" in log
    rerun = cli(*args, *engine_args(), cwd=workdir)
    assert rerun.returncode == 0, rerun.stderr
    assert len(engine_pids(rerun.stderr)) == 1 and engine_pids(rerun.stderr) != [pid]


def test_a_killed_job_lets_its_engine_serve_the_next_with_the_model_it_holds(models, tiny_demo, workdir):
    first = cli(*evaluate_args(models[0], workdir / "first", tiny_demo), *engine_args(), cwd=workdir)
    (pid,) = engine_pids(first.stderr)
    job = subprocess.Popen(cli_command(*evaluate_args(models[1], workdir / "killed", tiny_demo), *engine_args()),
                           cwd=workdir, stderr=subprocess.PIPE, text=True)
    for line in job.stderr:
        if "job 2" in line:
            job.kill()
            break
    job.wait()
    engine_log = next((workdir / "logs" / "engine").iterdir())
    deadline = time.monotonic() + 60
    while "is gone" not in engine_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "is gone: stopped working for it" in engine_log.read_text()
    following = cli(*evaluate_args(models[2], workdir / "following", tiny_demo), *engine_args(), cwd=workdir)
    assert following.returncode == 0, following.stderr
    # the same engine, and the model it held is swapped, not rebuilt
    assert not engine_pids(following.stderr) and alive(pid) and "swapped in" in following.stderr


def test_an_idle_engine_ends_and_its_socket_is_private(models, tiny_demo, workdir):
    result = cli(*evaluate_args(models[0], workdir / "out", tiny_demo), *engine_args(idle_timeout=1), cwd=workdir)
    assert result.returncode == 0, result.stderr
    (pid,) = engine_pids(result.stderr)
    engine_log = next((workdir / "logs" / "engine").iterdir()).read_text()
    socket_path = Path(re.search(r"listening on (\S+)", engine_log).group(1))
    for directory in (socket_path.parent, socket_path.parent.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert ended(pid) and not socket_path.exists()
    assert "idle for 1 s: ended" in next((workdir / "logs" / "engine").iterdir()).read_text()


def test_a_directory_others_may_enter_is_refused(models, tiny_demo, tmp_path):
    temporary = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))  # short enough a path for a socket in it
    shared = temporary / f"ckpt-stability-{os.getuid()}"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    environment = {key: value for key, value in os.environ.items() if key != "XDG_RUNTIME_DIR"}
    try:
        result = cli(*evaluate_args(models[0], tmp_path / "out", tiny_demo), *engine_args(), cwd=tmp_path,
                     env={**environment, "TMPDIR": str(temporary)})
    finally:
        shutil.rmtree(temporary)
    assert result.returncode == 2
    assert f"{shared}: the evaluation engines' directory must be a directory of yours that only you may enter" \
           in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_workflow_gives_the_same_results_with_and_without_engines(tiny_demo, tmp_path):
    """The workflow's evaluations (--until evaluate: the reductions read only what they write) with and
    without engines."""
    predictions = {}
    for enabled in (True, False):
        workdir = tmp_path / f"engine-{enabled}"
        workdir.mkdir()
        config = {**small_config(tiny_demo / "checkpoints", tiny_demo / "tasks"),
                  "engine": {"enabled": enabled, "idle_timeout": 600}}
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        result = snakemake(workdir, "--until", "evaluate")
        assert result.returncode == 0, result.stderr[-3000:]
        files = sorted((workdir / "results" / "predictions").rglob("*.parquet"))
        assert len(files) == 7 * 3
        columns = ["example_id", "prediction", "score", "choice_logprobs"]
        predictions[enabled] = {path.relative_to(workdir): pd.read_parquet(path, columns=columns) for path in files}
        evaluation_logs = "".join(path.read_text() for path in (workdir / "logs" / "evaluate").rglob("*.log"))
        started = engine_pids(evaluation_logs)
        if enabled:
            # one engine per concurrent job (2 cores), each serving several of the 7 models
            assert 1 <= len(started) <= 2 and evaluation_logs.count("swapped in") == 7 - len(started)
            # the workflow's end ends them
            assert all(ended(pid, seconds=10) for pid in started)
        else:
            assert not started and "swapped in" not in evaluation_logs
    assert predictions[True].keys() == predictions[False].keys()
    for path, table in predictions[True].items():
        pd.testing.assert_frame_equal(table, predictions[False][path], check_exact=True)
    # the engine changes no result: turning it off (or changing its settings) redoes nothing
    workdir = tmp_path / "engine-True"
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    (workdir / "config.yaml").write_text(yaml.safe_dump({**config, "engine": {"enabled": False}}))
    dry_run = snakemake(workdir, "--dry-run", "--until", "evaluate")
    assert dry_run.returncode == 0 and re.search(r"^total\s+0$", dry_run.stdout, re.M), dry_run.stdout


def test_any_gpu_id_makes_a_slot_name_and_every_slot_of_a_directory_is_exclusive(tmp_path):
    names = [slot_name(gpu) for gpu in ("0", "MIG-GPU-6b6ab1f0-3f4e/1/0", "GPU-6b6ab1f0-3f4e-4a8e-9f0e-1c2d3e4f5a6b")]
    assert names[0] == "gpu0" and all(re.fullmatch(r"gpu-?[0-9a-z]{1,12}", name) for name in names)
    first = take_slot(tmp_path, None)
    second = take_slot(tmp_path, None)
    assert (first.name, second.name) == ("cpu000", "cpu001")
    first.release()
    assert take_slot(tmp_path, None).name == "cpu000"
    assert take_slot(tmp_path, "MIG-GPU-6b6ab1f0-3f4e/1/0").lock_path.parent == tmp_path


def test_a_malformed_log_call_in_a_job_does_not_fail_it():
    """As with logging to a stream in the job's own process: reported, and the job goes on."""
    ours, theirs = socket.socketpair()
    with ours.makefile("rwb") as stream:
        relay = _Relay(stream)
        relay.handleError = lambda record: None  # logging's own report goes to stderr
        relay.emit(logging.LogRecord("ckpt_stability", logging.INFO, __file__, 1, "%d models", ("many",), None))
        relay.emit(logging.LogRecord("ckpt_stability", logging.INFO, __file__, 1, "a path %s", ("caf\udce9",), None))
    theirs.settimeout(5)
    received = theirs.recv(4096).decode()
    assert json.loads(received)["log"].endswith("a path caf\udce9")
