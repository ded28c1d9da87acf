"""Time how long Snakemake takes to build the workflow's DAG for a long run (a dry run).

Writes synthetic checkpoint directories that pass the workflow's discovery (a `config.json` and a
`model.safetensors` whose header is valid and whose byte count matches the file: a few hundred
bytes each) and tiny llm-jp-eval task files, then times `snakemake --dry-run` on them as a fresh
subprocess, from the workflow's own Snakefile. Default: 1,000 checkpoints, windows 1, 2, 4 and 8,
the avg, vote and prob methods, 9 tasks (6 choice, 3 generate): about 10,000 jobs. Goal (issue #7):
the DAG builds in under a minute on a 2-core machine.

    python benchmarks/bench_dag.py                      # the full size
    python benchmarks/bench_dag.py --checkpoints 100    # a quick run
    python benchmarks/bench_dag.py --profile            # also write a cProfile of one dry run

Nothing is evaluated: the dry run only parses the workflow, discovers the checkpoints and plans the
jobs. The work directory (default /tmp/bench_dag) is reused by later runs with the same sizes; its
`.snakemake/` is removed before every timing, so each dry run starts without any recorded state.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_checkpoint(directory: Path) -> None:
    """A checkpoint that discovery counts as complete: config.json plus a valid, whole safetensors file."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text('{"model_type": "llama"}\n')
    header = json.dumps({"weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))


def write_task(path: Path, choice: bool) -> None:
    task = {
        "instruction": "答えてください。",
        "output_length": 3,
        "metrics": ["exact_match"],
        "few_shots": [{"input": f"{i}+{i}", "output": str(2 * i)} for i in range(1, 5)],
        "samples": [{"input": "2+2", "output": "4"}, {"input": "1+3", "output": "4"}],
    }
    if choice:
        task["label_list"] = ["2", "4", "6", "8"]
    path.write_text(json.dumps(task, ensure_ascii=False))


def prepare(workdir: Path, checkpoints: int, every: int, windows: list[int], tasks: int, choice: int) -> Path:
    """The synthetic run, the tasks and the config; returns the config's path."""
    stamp = workdir / f".prepared-{checkpoints}-{every}-{tasks}-{choice}"
    config = workdir / "config.yaml"
    task_dir = workdir / "tasks"
    if not stamp.exists():
        if workdir.exists():
            shutil.rmtree(workdir)
        started = time.perf_counter()
        for index in range(1, checkpoints + 1):
            write_checkpoint(workdir / "run" / f"checkpoint-{index * every}")
        task_dir.mkdir(parents=True)
        for index in range(tasks):
            write_task(task_dir / f"task{index}.json", choice=index < choice)
        stamp.touch()
        print(f"wrote {checkpoints} synthetic checkpoints and {tasks} tasks under {workdir} "
              f"in {time.perf_counter() - started:.1f} s")
    config.write_text(yaml.safe_dump({
        "runs": {"run1": f"{workdir / 'run'}/checkpoint-{{step}}"},
        "windows": windows,
        "methods": ["avg", "vote", "prob"],
        "tasks": {f"task{index}": {"path": str(task_dir / f"task{index}.json"),
                                   "category": "MC" if index < choice else "QA",
                                   "mode": "choice" if index < choice else "generate"}
                  for index in range(tasks)},
        "backend": "transformers",
    }))
    return config


def dry_run(snakefile: Path, workdir: Path, config: Path, profile: Path | None) -> tuple[float, dict[str, int], str]:
    """Seconds of one `snakemake --dry-run` (process start to exit), its job counts per rule, its output."""
    shutil.rmtree(workdir / ".snakemake", ignore_errors=True)
    prefix = [sys.executable, "-m", "cProfile", "-o", str(profile)] if profile else [sys.executable]
    command = [*prefix, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
               "--configfile", str(config), "--cores", "2", "--dry-run", "--quiet", "rules"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    if result.returncode != 0:
        sys.exit(f"snakemake failed ({result.returncode}):\n{output[-4000:]}")
    # the "Job stats" table: one "<rule> <count>" line per rule, then "total <count>"
    counts = {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", output, re.MULTILINE)}
    return seconds, counts, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, default=1000)
    parser.add_argument("--every", type=int, default=1000, help="steps between checkpoints")
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tasks", type=int, default=9)
    parser.add_argument("--choice-tasks", type=int, default=6, help="how many of the tasks are choice tasks")
    parser.add_argument("--repeat", type=int, default=1, help="timed dry runs (the best is reported)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_dag"))
    parser.add_argument("--snakefile", type=Path, default=ROOT / "Snakefile",
                        help="the workflow to time (default: this repository's)")
    parser.add_argument("--profile", action="store_true",
                        help="run one more dry run under cProfile; print its top functions")
    args = parser.parse_args()

    workdir = args.workdir.resolve()
    config = prepare(workdir, args.checkpoints, args.every, args.windows, args.tasks, args.choice_tasks)
    times = []
    for _ in range(args.repeat):
        seconds, counts, _ = dry_run(args.snakefile, workdir, config, None)
        times.append(seconds)
    best = min(times)
    rules = ", ".join(f"{rule} {count}" for rule, count in counts.items() if rule != "total")
    print(f"{args.checkpoints} checkpoints x windows {args.windows} x {args.tasks} tasks: "
          f"{counts.get('total', 0)} jobs ({rules})")
    print(f"dry run (DAG build, process start to exit): {best:.1f} s"
          + (f" (best of {args.repeat}: {', '.join(f'{t:.1f}' for t in times)})" if args.repeat > 1 else "")
          + f"; goal: under 60 s -> {'met' if best < 60 else 'NOT met'}")
    if args.profile:
        import pstats

        path = workdir / "dry-run.prof"
        dry_run(args.snakefile, workdir, config, path)
        print(f"\ncProfile of one dry run ({path}), top 25 by cumulative time:")
        pstats.Stats(str(path)).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
