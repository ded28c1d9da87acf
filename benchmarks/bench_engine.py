"""The evaluation engine against a cold process per model: what each model costs beyond its inference.

Runs the workflow's evaluation of the first N demo checkpoints through `snakemake --until evaluate` on
1 core (one job at a time, so that wall time adds up per model), with the engine (config
`engine: {enabled: true}`) and without it (a cold process per model), for a small and a large N, all in
one invocation of this script. Each model's inference time is read from its job log (the seconds of each
task and of the perplexity). What a run costs beyond inference (wall time - inference time) is a fixed
part (Snakemake's start and DAG, the first engine's imports) plus a part per model (Snakemake's per-job
overhead, the job's process, and the imports and model building of a cold process or the weight swap of
an engine); the difference between the two sizes gives the part per model:

    cost beyond inference per model = (beyond(N_large) - beyond(N_small)) / (N_large - N_small)

Goal (issue #19): <= 0.5 s per model on the CPU with the engine. Needs the demo's checkpoints (run
`snakemake` first), or --demo.

    python benchmarks/bench_engine.py            # 8 and 24 models, the demo's 4 tasks and perplexity
    python benchmarks/bench_engine.py --quick    # 4 and 8 models
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
    """The demo's config (tasks, prompts, batch size) on the given checkpoints, raw models only, no fine-tunes."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for task in config["tasks"].values():
        task["path"] = str(demo / "tasks" / Path(task["path"]).name)
    for section in ("demo", "finetune", "averaging"):  # raw models only: no averaging method's windows to check
        config.pop(section)
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
        sys.exit(f"snakemake failed in {workdir}:\n{result.stdout[-2000:]}{result.stderr[-4000:]}")
    return wall, inference_seconds(workdir / "logs" / "evaluate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=ROOT / "results" / "demo",
                        help="the demo's directory: tasks/, heldout.txt and the run base/ (default results/demo)")
    parser.add_argument("--models", type=int, nargs=2, default=[8, 24], metavar=("SMALL", "LARGE"),
                        help="the two numbers of models (default 8 24)")
    parser.add_argument("--quick", action="store_true", help="4 and 8 models")
    args = parser.parse_args()
    small, large = (4, 8) if args.quick else args.models
    found = sorted((args.demo / "base").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[-1]))
    if len(found) < large:
        sys.exit(f"{args.demo / 'base'}: {len(found)} checkpoints, {large} wanted; run the demo first (snakemake)")

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        for count in (small, large):
            selected = Path(tmp) / f"checkpoints-{count}"
            selected.mkdir()
            for checkpoint in found[:count]:
                (selected / checkpoint.name).symlink_to(checkpoint.resolve())
            for label, engine in (("cold process", False), ("engine", True)):
                results[label, count] = measure(args.demo, selected, engine, Path(tmp) / f"{engine}-{count}")

    print(f"demo models of {args.demo / 'base'}, 4 tasks and perplexity each, snakemake --cores 1")
    print(f"{'':<14}{'models':>7}{'wall s':>9}{'inference s':>13}{'beyond s':>10}")
    for (label, count), (wall, inference) in results.items():
        print(f"{label:<14}{count:7d}{wall:9.1f}{inference:13.1f}{wall - inference:10.1f}")
    per_model = {}
    for label in ("cold process", "engine"):
        (wall_small, inference_small), (wall_large, inference_large) = results[label, small], results[label, large]
        per_model[label] = ((wall_large - inference_large) - (wall_small - inference_small)) / (large - small)
        fixed = (wall_small - inference_small) - small * per_model[label]
        print(f"{label}: {per_model[label]:.2f} s per model beyond inference, {fixed:.1f} s fixed")
    against_cold = (f"{per_model['cold process'] / per_model['engine']:.1f}x less than a cold process per model"
                    if per_model["engine"] > 0 else "within the noise of 0 (too few models, or a busy machine)")
    print(f"engine: {per_model['engine']:.2f} s per model (goal <= 0.5), {against_cold}")


if __name__ == "__main__":
    main()
