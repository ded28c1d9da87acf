"""Every benchmark still runs: each script's quickest mode on tiny inputs, its figures printed.

The figures themselves are not asserted (they are measurements, see benchmarks/README.md); what is asserted
is that the script ends normally and prints the lines it exists for, with its agreement checks passing."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args, cwd: Path = ROOT) -> str:
    """Run ``benchmarks/<script>`` with the project's interpreter; its stdout, or a failure showing its end."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)], cwd=cwd,
                            capture_output=True, text=True)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def demo_layout(tiny_demo, tmp_path_factory) -> Path:
    """The tiny demo arranged as the workflow's demo directory: ``tasks/``, ``heldout.txt``, ``finetune/`` and
    the run ``base/checkpoint-*``."""
    directory = tmp_path_factory.mktemp("demo layout")
    for name in ("tasks", "heldout.txt", "finetune"):
        (directory / name).symlink_to(tiny_demo / name)
    (directory / "base").symlink_to(tiny_demo / "checkpoints")
    return directory


def test_averaging_is_bit_identical_to_its_definitions(tmp_path):
    output = bench("bench_averaging.py", "--count", 2, "--size-mb", 4, "--repeat", 1, "--ours-only", "--dcp",
                   "--workdir", tmp_path)
    assert re.search(r"^ckpt-stability average\s+\d+\.\d+", output, re.MULTILINE)
    assert re.search(r"^DCP read in place: \d+\.\d+x the safetensors path's time", output, re.MULTILINE)
    assert re.search(r"^diagnostics: uniform with --diagnostics \d+\.\d+x the time without", output, re.MULTILINE)
    for label in ("ckpt-stability average", "ckpt-stability average, DCP", "ckpt-stability average --diagnostics"):
        assert f"{label}: bit-identical to the fp32-accumulated mean" in output
    for scheme in ("wsm 1-sqrt", "ema half-life 500"):  # steps 1000 and 2000: half the span
        assert re.search(rf"^{scheme}: \d+\.\d+x the uniform mean's time", output, re.MULTILINE)
        assert f"ckpt-stability {scheme}: bit-identical to ckpt-stability's {scheme} sum" in output


def test_conversion_disk(tmp_path):
    output = bench("bench_conversion.py", "--checkpoints", 3, "--windows", 1, "--hidden-size", 64,  # the fewest
                   "--workdir", tmp_path)
    assert re.search(r"^peak on disk at once: +\d+\.\d+ MB = \d+\.\d+ conversions", output, re.MULTILINE)


def test_dag_dry_run(tmp_path):
    output = bench("bench_dag.py", "--checkpoints", 12, "--windows", 1, 2, "--tasks", 2, "--choice-tasks", 1,
                   "--workdir", tmp_path)
    assert re.search(r"^dry run \(DAG build, process start to exit\): \d+\.\d+ s", output, re.MULTILINE)


def test_reduction(tmp_path):
    output = bench("bench_reduction.py", "--checkpoints", 6, "--tasks", 3, "--examples", 20, "--windows", "1,2",
                   "--workdir", tmp_path)
    assert re.search(r"reduction total:\s+\d+\.\d+ s", output)


def test_inference_ours_only(tiny_demo):
    output = bench("bench_inference.py", "--ours-only", "--model", tiny_demo / "checkpoints" / "checkpoint-40",
                   "--task", tiny_demo / "tasks" / "demo_nli.json", "--num-fewshot", 1)
    assert re.search(r"^ckpt-stability evaluate\s+\d+\.\d+\s+\d+\.\d+$", output, re.MULTILINE)


def test_engine_against_cold_processes(demo_layout):
    output = bench("bench_engine.py", "--demo", demo_layout, "--models", 3, 4)  # 3: the fewest a run takes
    # a slope measured over 3 and 4 tiny models may come out below 0 on a busy machine: a measurement all the same
    assert re.search(r"^engine: -?\d+\.\d+ s per model \(goal <= 0.5\)", output, re.MULTILINE)


def test_finetune(demo_layout):
    output = bench("bench_finetune.py", "--demo-dir", demo_layout, "--runs", "base", "--models", 1)
    assert re.search(r"^base\s+mean\s+\d+\.\d+\s+\d+\.\d+\s+\d+\.\d+$", output, re.MULTILINE)


def test_vllm_agrees_with_transformers_and_its_swap_with_a_fresh_engine(vllm_demo):
    checkpoints = sorted((vllm_demo / "checkpoints").iterdir())[-2:]
    output = bench("bench_vllm.py", "--checkpoints", *checkpoints, "--tasks", vllm_demo / "tasks" / "demo_nli.json",
                   "--heldout", vllm_demo / "heldout.txt")
    rows = re.findall(r"^(checkpoint-\d+)\s+(\d+)/(\d+)\s+(\S+)\s+(\d+)/(\d+)\s+(\S+)", output, re.MULTILINE)
    assert [row[0] for row in rows] == [checkpoint.name for checkpoint in checkpoints]
    for _, swapped_same, swapped_total, _, fresh_same, fresh_total, _ in rows:
        assert swapped_same == swapped_total and fresh_same == fresh_total


def test_pick(tmp_path):
    output = bench("bench_pick.py", "--checkpoints", 40, "--examples", 100, "--results", tmp_path)
    assert len(re.findall(r"^  .+\s+\d+\.\d+ s   \(goal <= 10 s\)   recommended step \d+, \d+ checkpoints",
                          output, re.MULTILINE)) == 2
