"""Time the reductions (scores table, stability and improvement tables) at the scale of a long run.

Writes synthetic prediction files by the output contract (default: 1,000 checkpoints, windows 1, 2, 4
and 8 with the avg, vote and prob methods, 9 tasks of which 6 are scored by choice, 1,000 examples
each), then runs the same code as the workflow's `scores` and `stability` rules and prints the time of
each stage. Goal (issue #5): the reduction takes under a minute on a 2-core machine.

    python benchmarks/bench_reduction.py                     # the full size (~81,000 files, ~2.5 GB)
    python benchmarks/bench_reduction.py --checkpoints 100   # a quick run
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ckpt_stability.plan import Plan
from ckpt_stability.predictions import METADATA_KEY, SCHEMA
from ckpt_stability.stability import gather_scores, improvement_table, stability_table, write_scores, write_table

LABELS = ["A", "B", "C", "D"]
ANSWERS = ["東京", "東京都", "大阪", "京都", "札幌", "北海道"]


def write_file(path: Path, rng: np.random.Generator, examples: int, mode: str, gold: list[str], skill: float) -> None:
    """One prediction file whose examples are right with probability ``skill`` (noisy from file to file)."""
    correct = rng.random(examples) < skill
    if mode == "choice":
        predictions = np.where(correct, gold, rng.choice(LABELS, examples))
        logprobs = np.log(rng.dirichlet(np.ones(len(LABELS)), examples))
        logprob_column = pa.array(logprobs.tolist(), pa.list_(pa.float64()))
        metric = "exact_match"
    else:
        predictions = np.where(correct, gold, rng.choice(ANSWERS, examples))
        logprob_column = pa.nulls(examples, pa.list_(pa.float64()))
        metric = "char_f1"
    scores = (predictions == np.asarray(gold)).astype(float)
    provenance = {"task": {"mode": mode, "metric": metric}, "score": float(scores.mean()), "n_examples": examples}
    table = pa.table([pa.array(np.arange(examples)), pa.array(predictions.tolist()), pa.array(gold),
                      pa.array(scores), logprob_column],
                     schema=SCHEMA.with_metadata({METADATA_KEY: json.dumps(provenance)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def synthesize(plan: Plan, examples: int, seed: int) -> int:
    jobs = []
    for run in plan.runs:
        for method, window, steps, tasks in plan.series(run):
            for task in tasks:
                for position, step in enumerate(steps):
                    jobs.append((plan.path(run, method, window, step, task), plan.tasks[task].mode, task,
                                 position / len(steps)))
    golds = {task: np.random.default_rng(index).choice(LABELS if spec.mode == "choice" else ANSWERS,
                                                       examples).tolist()
             for index, (task, spec) in enumerate(plan.tasks.items())}

    def write(job_index):
        path, mode, task, progress = jobs[job_index]
        rng = np.random.default_rng([seed, job_index])
        write_file(path, rng, examples, mode, golds[task], skill=0.3 + 0.4 * progress)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(len(jobs))))
    return len(jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=9)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--windows", default="1,2,4,8")
    parser.add_argument("--workdir", help="keep the synthetic files here (default: a temporary directory)")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-reduction-"))
    tasks = {f"task{i}": {"category": f"C{i % 3}", "mode": "choice" if i % 3 else "generate"}
             for i in range(args.tasks)}
    plan = Plan(runs={"bench": list(range(100, 100 * (args.checkpoints + 1), 100))},
                windows=[int(w) for w in args.windows.split(",")], methods=["avg", "vote", "prob"], tasks=tasks,
                final_fraction=0.2, predictions=str(workdir / "predictions"))
    started = time.perf_counter()
    files = synthesize(plan, args.examples, seed=0)
    print(f"synthetic predictions: {files} files of {args.examples} examples, "
          f"written in {time.perf_counter() - started:.1f} s (setup, not timed below)")

    timings = {}
    started = time.perf_counter()
    scores = gather_scores(plan)
    write_scores(scores, workdir / "scores.parquet")
    timings["scores table"] = time.perf_counter() - started
    started = time.perf_counter()
    stability = stability_table(plan, scores)
    improvement = improvement_table(stability, scores)
    write_table(stability, workdir / "tables" / "stability.csv")
    write_table(improvement, workdir / "tables" / "improvement.csv")
    timings["stability + improvement"] = time.perf_counter() - started
    for stage, seconds in timings.items():
        print(f"{stage:>24}: {seconds:6.1f} s")
    print(f"{'reduction total':>24}: {sum(timings.values()):6.1f} s   (goal: under 60 s)")
    print(f"rows: scores {len(scores)}, stability {len(stability)}, improvement {len(improvement)}; "
          f"segment {len(plan.segment('bench'))} steps")
    if not args.workdir:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
