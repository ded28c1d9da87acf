"""The evaluation engine against a cold process per model: what each model costs beyond its inference.

Runs the workflow's evaluation of the same N demo checkpoints twice in one invocation of this script,
through `snakemake --until evaluate` on 1 core (one job at a time, so that wall time adds up per model):
once with the engine (config `engine: {enabled: true}`), once without (a cold process per model). Each
model's inference time is read from its job log (the seconds of each task and of the perplexity), and

    cost beyond inference per model = (workflow wall time - total inference time) / N

which holds Snakemake's own per-job overhead, the process start, the imports and the model loading (the
fixed start of Snakemake itself is spread over the N models). Goal (issue #19): <= 0.5 s per model on
the CPU with the engine. Needs the demo's checkpoints (run `snakemake` first), or --demo.

    python benchmarks/bench_engine.py            # 24 models, the demo's 4 tasks and perplexity
    python benchmarks/bench_engine.py --quick    # 8 models
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SECONDS = re.compile(r"\((\d+\.\d+) s\)$")


def demo_config(demo: Path, checkpoints: Path, engine: bool) -> dict:
    """The demo's config (tasks, prompts, batch size) on the given checkpoints, raw models only."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for task in config["tasks"].values():
        task["path"] = str(demo / "tasks" / Path(task["path"]).name)
    config.pop("demo")
    return {**config, "runs": {"bench": f"{checkpoints}/checkpoint-{{step}}"}, "windows": [1], "methods": [],
            "perplexity_text": str(demo / "heldout.txt"), "backend": "transformers", "engine": {"enabled": engine}}


def inference_seconds(logs: Path) -> float:
    """The seconds that the job logs give for each task and each perplexity."""
    return sum(float(match.group(1)) for log in logs.rglob("*.log") for line in log.read_text().splitlines()
               if (match := SECONDS.search(line)) and ("over" in line))


def measure(demo: Path, checkpoints: Path, engine: bool, workdir: Path) -> tuple[float, float]:
    """Wall time of the evaluation of every checkpoint, and the total inference time in it."""
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(demo_config(demo, checkpoints, engine)))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory",
               str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", "1", "--until", "evaluate",
               "--quiet", "all"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"snakemake failed in {workdir}:\n{result.stderr[-4000:]}")
    return wall, inference_seconds(workdir / "logs" / "evaluate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=ROOT / "results" / "demo",
                        help="the demo's directory: tasks/, heldout.txt and the run base/ (default results/demo)")
    parser.add_argument("--models", type=int, default=24, help="how many of its checkpoints (default 24)")
    parser.add_argument("--quick", action="store_true", help="8 models")
    args = parser.parse_args()
    count = 8 if args.quick else args.models
    found = sorted((args.demo / "base").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[-1]))
    if len(found) < count:
        sys.exit(f"{args.demo / 'base'}: {len(found)} checkpoints, {count} wanted; run the demo first (snakemake)")

    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        selected = Path(tmp) / "checkpoints"
        selected.mkdir()
        for checkpoint in found[:count]:
            (selected / checkpoint.name).symlink_to(checkpoint.resolve())
        results = {label: measure(args.demo, selected, engine, Path(tmp) / label.replace(" ", "-"))
                   for label, engine in (("cold process", False), ("engine", True))}

    print(f"{count} demo models ({args.demo / 'base'}), 4 tasks and perplexity each, snakemake --cores 1")
    print(f"{'':<14}{'wall s':>9}{'inference s':>13}{'beyond inference s/model':>27}")
    beyond = {}
    for label, (wall, inference) in results.items():
        beyond[label] = (wall - inference) / count
        print(f"{label:<14}{wall:9.1f}{inference:13.1f}{beyond[label]:27.2f}")
    print(f"engine: {beyond['engine']:.2f} s per model beyond inference (goal <= 0.5), "
          f"{beyond['cold process'] / beyond['engine']:.1f}x less than a cold process per model")


if __name__ == "__main__":
    main()
