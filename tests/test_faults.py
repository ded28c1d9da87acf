"""Faults: a job killed mid-work, a full disk, a backend out of memory. Each fails cleanly with a message
that names the path and the problem, leaves no output that looks complete, and a rerun finishes the job.

Killing ``ckpt-stability average`` mid-write is tested in test_averaging.py
(``test_a_killed_job_leaves_no_complete_looking_output``), the removal of a killed writer's leftovers in
test_atomic.py.
"""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ckpt_stability.predictions import read_predictions
from helpers import JGLUE, cli, cli_command, snakemake, snakemake_command


def long_task(source: Path, path: Path, repeat: int) -> Path:
    """``source`` with its samples repeated: a task whose inference surely lasts seconds."""
    task = json.loads(source.read_text(encoding="utf-8"))
    task["samples"] = task["samples"] * repeat
    path.write_text(json.dumps(task, ensure_ascii=False), encoding="utf-8")
    return path


def wait_until(condition: Callable, process: subprocess.Popen, timeout: float = 300):
    """Poll ``condition`` until it returns something true, and return that, while ``process`` runs."""
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert process.poll() is None, "the process ended before the awaited moment"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return found


def temporaries(directory: Path) -> list[str]:
    """Temporary outputs (``.{name}.{pid}.{random}.tmp``, see ckpt_stability.atomic) anywhere under ``directory``."""
    return [str(path) for path in directory.rglob(".*.tmp")]


# ---------------------------------------------------------------- killed jobs


def test_a_killed_evaluation_leaves_no_complete_looking_output(tiny_model_dir, tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"tasks": {
        "jnli": {"path": str(JGLUE / "jnli.json"), "mode": "choice", "num_fewshot": 1, "max_samples": 2},
        "long": {"path": str(long_task(JGLUE / "jnli.json", tmp_path / "long.json", 10)), "mode": "choice",
                 "num_fewshot": 1},
    }}))
    out = tmp_path / "out"
    command = cli_command("evaluate", "--model", tiny_model_dir, "--settings", settings, "--backend", "transformers",
                          "--output-dir", out)
    job = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    # the first task's file is written: the job is now inside the long task's inference
    wait_until(lambda: (out / "jnli.parquet").exists(), job)
    job.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL
    # the finished task's file is complete; of the killed one, at most a temporary name
    assert [path.name for path in out.iterdir() if not path.name.startswith(".")] == ["jnli.parquet"]

    subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
    assert len(read_predictions(out / "long.parquet").prediction) == 10 * 24
    assert temporaries(out) == []


def session_process(session: int, *arguments: str) -> int:
    """The process of ``session`` whose command line holds all of ``arguments`` (a workflow job's python, not
    the shell that started it, whose command line is one string)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getsid(int(entry.name)) == session:
                command_line = (entry / "cmdline").read_bytes().split(b"\0")
                if all(argument.encode() in command_line for argument in arguments):
                    return int(entry.name)
        except OSError:  # the process has ended meanwhile
            continue
    raise AssertionError(f"no process {arguments} in session {session}")


def test_killed_workflow_jobs_and_a_killed_workflow_are_finished_by_a_rerun(tiny_demo, tmp_path):
    """A job killed mid-inference (by the OOM killer, a cluster's time limit): snakemake deletes its outputs
    and, with the default profile's keep-going, finishes the other jobs. Snakemake itself killed with its
    job (a lost terminal or node): its lock and incomplete markers stay; after ``--unlock`` the next run
    redoes the incomplete job (the profile's rerun-incomplete)."""
    for step in (10, 20, 30):  # the fewest checkpoints that window 1 needs
        name = f"checkpoint-{step}"
        shutil.copytree(tiny_demo / "checkpoints" / name, tmp_path / "checkpoints" / name)
    colors = tiny_demo / "tasks" / "demo_colors.json"
    config = {
        "runs": {"tiny": f"{tmp_path}/checkpoints/checkpoint-{{step}}"},
        "windows": [1],
        "methods": [],
        # evaluated in this order: once demo_colors.parquet is written, the job is in the long task
        "tasks": {"demo_colors": {"path": str(colors), "category": "MC", "mode": "choice"},
                  "long": {"path": str(long_task(colors, tmp_path / "long.json", 25)), "category": "MC",
                           "mode": "choice"}},
        "backend": "transformers",
    }
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    predictions = workdir / "results" / "predictions" / "tiny" / "raw1"

    def job_in_long_task() -> Path | None:
        return next((step for step in predictions.glob("step*")
                     if (step / "demo_colors.parquet").exists() and not (step / "long.parquet").exists()), None)

    def start() -> subprocess.Popen:
        # a session of its own: its jobs can be told from other processes, and killed with it
        with open(workdir / "snakemake.log", "a") as log:
            return subprocess.Popen(snakemake_command(workdir), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    workflow = start()
    step = wait_until(job_in_long_task, workflow)
    os.kill(session_process(workflow.pid, "evaluate", f"results/predictions/tiny/raw1/{step.name}"), signal.SIGKILL)
    assert workflow.wait() == 1
    assert list(step.glob("*")) == []  # snakemake deletes the failed job's outputs, its finished first file too
    assert sum(1 for _ in predictions.rglob("long.parquet")) == 2  # the other jobs went on

    workflow = start()
    wait_until(job_in_long_task, workflow)
    os.killpg(workflow.pid, signal.SIGKILL)
    workflow.wait()
    assert not (step / "long.parquet").exists()
    locked = snakemake(workdir)
    assert locked.returncode != 0 and "--unlock" in locked.stderr

    assert snakemake(workdir, "--unlock").returncode == 0
    rerun = snakemake(workdir)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert sum(1 for _ in predictions.rglob("long.parquet")) == 3
    assert (workdir / "results" / "tables" / "stability.csv").is_file()
    assert temporaries(workdir / "results") == []


# ---------------------------------------------------------------- a full disk

FREE_BYTES = 4096
"""one page: the write of any output larger than that fails part-way"""


@dataclass(frozen=True)
class FullDisk:
    path: Path
    errno: int
    """what a write there fails with"""
    limit_writer: Callable[[], None] | None
    """the ``preexec_fn`` of a process that writes there"""


@pytest.fixture
def full_disk(tmp_path):
    """A directory on a full disk: a 1 MiB tmpfs filled up to its last page. Where mounting is not permitted
    (an unprivileged container), the size of the files the writing process may write is limited to the same
    one page (RLIMIT_FSIZE) instead: the write fails part-way just the same, with EFBIG instead of ENOSPC."""
    path = tmp_path / "disk"
    path.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        yield FullDisk(path, errno.EFBIG,
                       lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (FREE_BYTES, FREE_BYTES)))
        return
    try:
        (path / "filler").write_bytes(bytes(2**20 - FREE_BYTES))
        yield FullDisk(path, errno.ENOSPC, None)
    finally:
        subprocess.run(["umount", str(path)], check=True)


def assert_failed_cleanly(result: subprocess.CompletedProcess, command: str, path: Path, error: int) -> None:
    """Exit status 1 and, as the last line, one error that names ``path`` and the reason; no traceback."""
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"ckpt-stability {command}: error: {path}: ") and os.strerror(error) in message
    assert "Traceback" not in result.stderr


def test_a_full_disk_fails_averaging_cleanly(tiny_demo, full_disk):
    before = set(full_disk.path.iterdir())
    out = full_disk.path / "avg"
    result = cli("average", "--output", out, *(tiny_demo / "checkpoints" / f"checkpoint-{step}" for step in (10, 20)),
                 preexec_fn=full_disk.limit_writer)
    assert_failed_cleanly(result, "average", out, full_disk.errno)
    assert set(full_disk.path.iterdir()) == before


def test_a_full_disk_fails_evaluation_cleanly(tiny_model_dir, full_disk):
    out = full_disk.path / "out"
    result = cli("evaluate", "--model", tiny_model_dir, "--task", JGLUE / "jnli.json", "--num-fewshot", "1",
                 "--backend", "transformers", "--output-dir", out, preexec_fn=full_disk.limit_writer)
    assert_failed_cleanly(result, "evaluate", out / "jnli.parquet", full_disk.errno)
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- out of memory

VOCABULARY = 2**18
MEMORY_LIMIT = 8 * 2**30
"""the address space of the evaluating process: about four times what it needs with batch size 1"""


@pytest.fixture(scope="module")
def wide_vocabulary_model(tiny_model_dir, tmp_path_factory) -> Path:
    """A 1-layer Llama with a 262,144-token vocabulary and the tiny model's tokenizer: its logits take 1 MiB
    per token, so scoring a batch of 32 prompts with two choices of 450 tokens needs 28 GiB at once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("wide-vocabulary")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCABULARY, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(directory)
    for tokenizer_file in tiny_model_dir.glob("tokenizer*"):
        shutil.copy(tokenizer_file, directory)
    return directory


def test_out_of_memory_suggests_a_smaller_batch(wide_vocabulary_model, tmp_path):
    task = tmp_path / "long_choices.json"
    choices = ["これは長い答えの文です。" * 30 + answer for answer in ("はい", "いいえ")]
    task.write_text(json.dumps({
        "instruction": "答えて", "output_length": 1, "metrics": ["exact_match"], "label_list": choices,
        "few_shots": [], "samples": [{"input": "これは質問です。", "output": choices[0]}] * 32,
    }, ensure_ascii=False), encoding="utf-8")
    # a real allocation failure, on any machine: the address space is limited (so the 28 GiB are refused
    # rather than swapped or OOM-killed); on the CPU (a CUDA context alone maps more than the limit), with
    # one thread and two malloc arenas (per-thread arenas would map gigabytes on a machine with many cores)
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
                   "TOKENIZERS_PARALLELISM": "false"}

    def evaluate(*options):
        return cli("evaluate", "--model", wide_vocabulary_model, "--task", task, "--num-fewshot", "0",
                   "--backend", "transformers", "--threads", "1", "--output-dir", tmp_path / "out", *options,
                   env=environment,
                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT)))

    result = evaluate("--batch-size", "32")
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"ckpt-stability evaluate: error: {wide_vocabulary_model}: task long_choices: "
                              f"the backend ran out of memory (RuntimeError: ")
    assert "can't allocate memory" in message and "lower batch_size (now 32; the config key, or --batch-size" in message
    assert not (tmp_path / "out").exists()
    # within the same limit, a batch of 1 fits (two samples: the wide logits make each one slow)
    assert evaluate("--batch-size", "1", "--max-samples", "2").returncode == 0
