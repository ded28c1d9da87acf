"""The vLLM backend against the transformers backend, on a GPU: agreement and throughput.

For each given checkpoint (by default the demo's last five) and each task (by default the demo's four),
both backends evaluate the same prompts in one process each, on the same GPU. Prints, per backend, the
wall time of model loading and of inference and the throughput (examples/s), then the share of
identical predictions (goal: >= 99%) and the statistics of |Δ log-likelihood| between the backends
over every (example, choice) of the choice tasks. Needs a GPU machine with the GPU environment
(envs/gpu.yaml, or `pip install -e ".[vllm]"`).

    python benchmarks/bench_vllm.py
    python benchmarks/bench_vllm.py --dtype float32 --checkpoints results/demo/base/checkpoint-480
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

RUN_ONE = """
import json, sys, time
from pathlib import Path
started = time.perf_counter()
from ckpt_stability.backends import load_backend
from ckpt_stability.evaluate import EvaluationSettings, evaluate_model
from ckpt_stability.tasks import load_task
backend_name, model, output, dtype, tasks = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
backend = load_backend(backend_name, model, dtype=dtype, batch_size=64)
loaded = time.perf_counter()
settings = EvaluationSettings([load_task(task, num_fewshot=4) for task in tasks])
evaluate_model(backend, model, settings, output)
done = time.perf_counter()
print(json.dumps({"load": loaded - started, "inference": done - loaded}))
"""


def run(backend: str, model: Path, output: Path, dtype: str, tasks: list[Path]) -> dict:
    result = subprocess.run([sys.executable, "-c", RUN_ONE, backend, str(model), str(output), dtype,
                             *map(str, tasks)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{backend} on {model} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo = ROOT / "results" / "demo"
    default_checkpoints = sorted((demo / "base").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))[-5:]
    parser.add_argument("--checkpoints", nargs="+", type=Path, default=default_checkpoints)
    parser.add_argument("--tasks", nargs="+", type=Path, default=sorted((demo / "tasks").glob("*.json")))
    parser.add_argument("--dtype", default="auto", help="auto: the checkpoint's 16-bit dtype, bf16 for fp32")
    args = parser.parse_args()
    if not args.checkpoints or not args.tasks:
        sys.exit("no checkpoints or tasks: run the demo first (snakemake), or pass --checkpoints and --tasks")

    from ckpt_stability.predictions import read_predictions

    times = {"transformers": {"load": 0.0, "inference": 0.0}, "vllm": {"load": 0.0, "inference": 0.0}}
    same = total = 0
    differences = []
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        for checkpoint in args.checkpoints:
            for backend in times:
                timing = run(backend, checkpoint, Path(tmp) / backend / checkpoint.name, args.dtype, args.tasks)
                for key in timing:
                    times[backend][key] += timing[key]
            for task in args.tasks:
                hf, vl = (read_predictions(Path(tmp) / backend / checkpoint.name / f"{task.stem}.parquet")
                          for backend in ("transformers", "vllm"))
                same += sum(a == b for a, b in zip(hf.prediction, vl.prediction))
                total += len(hf.prediction)
                if hf.choice_logprobs is not None:
                    differences.append(np.abs(hf.choice_logprobs - vl.choice_logprobs).ravel())
    examples = total  # both backends saw every example
    print(f"{len(args.checkpoints)} checkpoints x {len(args.tasks)} tasks = {examples} examples per backend, "
          f"dtype {args.dtype}")
    print(f"{'backend':<14}{'load s':>9}{'inference s':>13}{'examples/s':>12}")
    for backend, timing in times.items():
        print(f"{backend:<14}{timing['load']:9.1f}{timing['inference']:13.1f}"
              f"{examples / timing['inference']:12.1f}")
    print(f"identical predictions: {same}/{total} = {same / total:.2%}   (goal: >= 99%)")
    if differences:
        delta = np.concatenate(differences)
        print(f"|Δ log-likelihood| over {delta.size} (example, choice) pairs: mean {delta.mean():.2e}, "
              f"median {np.median(delta):.2e}, p99 {np.quantile(delta, 0.99):.2e}, max {delta.max():.2e}")


if __name__ == "__main__":
    main()
