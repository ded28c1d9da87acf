"""How long the pick takes (src/ckpt_stability/pick.py): one group at the scale of a long run, and the workflow's
whole `pick` rule on a finished run.

1. One group: --checkpoints x --examples synthetic 0/1 scores (accuracies rising from 0.40 to 0.60 along the
   run, independent examples), timed through ``pick_group`` as the rule runs it: Wilson intervals, the Model
   Confidence Set over B = 1,000 draws, the paired differences and McNemar's tests with Holm's correction;
   then the same scores with char_f1-like values in [0, 1], whose intervals are bootstrapped (B = 2,000).
   Goal (issue #28): at most 10 s for 1,000 x 1,000 on 2 cores.
2. The rule: `ckpt-stability pick` as a fresh process on the plan and scores of a finished workflow run
   (default: the demo's, results/; skipped when there is none).

    python benchmarks/bench_pick.py                                   # 1,000 x 1,000, and the demo's rule
    python benchmarks/bench_pick.py --checkpoints 100 --examples 200   # quicker
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ckpt_stability.pick import pick_group
from ckpt_stability.uncertainty import Strata

ROOT = Path(__file__).resolve().parents[1]


def synthetic_scores(checkpoints: int, examples: int, binary: bool, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    accuracy = np.linspace(0.40, 0.60, checkpoints)[:, None]
    if binary:
        return (rng.random((checkpoints, examples)) < accuracy).astype(float)
    return np.clip(rng.normal(accuracy, 0.25, (checkpoints, examples)), 0, 1)


def time_group(scores: np.ndarray) -> tuple[float, dict]:
    steps = list(range(100, 100 * (len(scores) + 1), 100))
    started = time.perf_counter()
    summary, _ = pick_group(Strata.single(scores), steps)
    return time.perf_counter() - started, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=1000)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--results", type=Path, default=ROOT / "results",
                        help="a finished workflow run's results/ (plan.json, scores.parquet) for the rule's timing")
    args = parser.parse_args()

    print(f"one group: {args.checkpoints} checkpoints x {args.examples} examples")
    for label, binary in (("0/1 scores (Wilson, MCS, McNemar)", True), ("scores in [0, 1] (bootstrap, MCS)", False)):
        seconds, summary = time_group(synthetic_scores(args.checkpoints, args.examples, binary))
        print(f"  {label:<36} {seconds:6.2f} s   (goal <= 10 s)   recommended step {summary['recommended_step']}, "
              f"{summary['set_size']} checkpoints indistinguishable")

    plan, scores = args.results / "plan.json", args.results / "scores.parquet"
    if not (plan.is_file() and scores.is_file()):
        print(f"the rule: skipped ({args.results} holds no finished run: run the demo first, `snakemake`)")
        return
    with tempfile.TemporaryDirectory(prefix="bench-pick-") as tmp:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ckpt_stability", "pick", "--plan", str(plan), "--scores", str(scores),
                        "--output", f"{tmp}/pick.csv", "--checkpoints", f"{tmp}/pick_checkpoints.parquet"],
                       check=True, cwd=args.results.parent)
        seconds = time.perf_counter() - started
        groups = sum(1 for _ in open(f"{tmp}/pick.csv")) - 1
    print(f"the rule on {args.results}: {seconds:.1f} s for {groups} groups (a fresh process, imports included)")


if __name__ == "__main__":
    main()
