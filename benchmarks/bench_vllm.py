"""The vLLM backend on a GPU: against transformers, and with weights swapped into one engine against a
fresh engine per checkpoint.

For the given checkpoints (by default the demo's last five) and tasks (by default the demo's four), runs
three evaluations of every checkpoint on the same GPU:

* ``transformers``: a fresh process per checkpoint;
* ``vllm fresh``: a fresh process, and so a fresh vLLM engine, per checkpoint;
* ``vllm swapped``: one process whose engine loads the first checkpoint and swaps the weights of each next
  one in (``LoadedModel``, as the evaluation engine does: ``collective_rpc("reload_weights")``, prefix
  cache reset, checksums checked).

Prints each one's model set-up time (engine start or weight swap) and inference time, then the agreement:
swapped against fresh vLLM (goal: identical predictions, |Δ log-likelihood| 0 or at the level of GPU
non-determinism) and vLLM against transformers (goal: >= 99% identical predictions). Needs a GPU machine
with the GPU environment (envs/gpu.yaml, or `pip install -e ".[vllm]"`).

    python benchmarks/bench_vllm.py
    python benchmarks/bench_vllm.py --dtype float32 --checkpoints results/demo/base/checkpoint-4{16,32,48,64,80}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

RUN_SEQUENCE = """
import json, sys, time
from ckpt_stability.backends import BackendOptions, LoadedModel
from ckpt_stability.evaluate import EvaluationSettings, evaluate_model
from ckpt_stability.tasks import load_task
backend, dtype, output, tasks, models = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(","), sys.argv[5:]
settings = EvaluationSettings([load_task(task, num_fewshot=4) for task in tasks])
loaded, timings = LoadedModel(), []
for number, model in enumerate(models):
    started = time.perf_counter()
    engine = loaded.load(model, BackendOptions(backend, dtype, batch_size=64))
    ready = time.perf_counter()
    evaluate_model(engine, model, settings, f"{output}/{number}")
    timings.append({"setup": ready - started, "inference": time.perf_counter() - ready})
loaded.close()
print(json.dumps(timings))
"""


def run(backend: str, models: list[Path], output: Path, dtype: str, tasks: list[Path]) -> list[dict]:
    """Evaluate ``models`` one after the other in one process; the set-up and inference time of each."""
    result = subprocess.run([sys.executable, "-c", RUN_SEQUENCE, backend, dtype, str(output),
                             ",".join(map(str, tasks)), *map(str, models)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{backend} on {', '.join(map(str, models))} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def agreement(first: Path, second: Path, count: int, tasks: list[Path]) -> str:
    from ckpt_stability.predictions import read_predictions

    same = total = 0
    differences = []
    for number in range(count):
        for task in tasks:
            a, b = (read_predictions(root / str(number) / f"{task.stem}.parquet") for root in (first, second))
            same += sum(x == y for x, y in zip(a.prediction, b.prediction))
            total += len(a.prediction)
            if a.choice_logprobs is not None:
                differences.append(np.abs(np.asarray(a.choice_logprobs) - np.asarray(b.choice_logprobs)).ravel())
    text = f"identical predictions {same}/{total} = {same / total:.2%}"
    if differences:
        delta = np.concatenate(differences)
        text += (f"; |Δ log-likelihood| over {delta.size} (example, choice) pairs: mean {delta.mean():.2e}, "
                 f"p99 {np.quantile(delta, 0.99):.2e}, max {delta.max():.2e}, exactly equal {np.mean(delta == 0):.2%}")
    return text


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

    count = len(args.checkpoints)
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        root = Path(tmp)
        timings = {}
        for label, backend in (("transformers", "transformers"), ("vllm fresh", "vllm")):
            timings[label] = []
            for number, checkpoint in enumerate(args.checkpoints):
                (timing,) = run(backend, [checkpoint], root / label / "single", args.dtype, args.tasks)
                (root / label / "single" / "0").rename(root / label / str(number))
                timings[label].append(timing)
        timings["vllm swapped"] = run("vllm", args.checkpoints, root / "vllm swapped", args.dtype, args.tasks)

        print(f"{count} checkpoints x {len(args.tasks)} tasks, dtype {args.dtype}")
        print(f"{'':<14}{'first set-up s':>16}{'later set-ups s (mean)':>24}{'inference s (mean)':>20}")
        for label, models in timings.items():
            later = [timing["setup"] for timing in models[1:]] or [float("nan")]
            print(f"{label:<14}{models[0]['setup']:16.1f}{np.mean(later):24.2f}"
                  f"{np.mean([timing['inference'] for timing in models]):20.2f}")
        print("vllm swapped vs vllm fresh:", agreement(root / "vllm swapped", root / "vllm fresh", count, args.tasks))
        print("vllm fresh vs transformers:", agreement(root / "vllm fresh", root / "transformers", count, args.tasks))


if __name__ == "__main__":
    main()
