"""Seconds per fine-tune of a demo checkpoint, with the demo's recipe (config/config.yaml, key finetune).

For each demo run (model size), fine-tunes N of its checkpoints with `ckpt-stability finetune`, one process
each as the workflow runs them, on the recipe's thread count, and reports per fine-tune:

* the process's wall time (imports, loading, training, saving);
* the fine-tune itself (the record's `seconds`: loading, tokenizing, training and saving in the process);
* a plain PyTorch loop over the same batches (AdamW, the same learning rate and linear decay, the same
  number of steps), timed in this process: the baseline for what the training loop costs through
  transformers' Trainer.

Needs the demo's checkpoints (run `snakemake` first), or --demo to pretrain them here (a few minutes).
--demo-dir reads another directory of the demo's layout (``finetune/train/``, ``<run>/checkpoint-*``).

    python benchmarks/bench_finetune.py              # 3 checkpoints of each run
    python benchmarks/bench_finetune.py --models 1   # quicker
    python benchmarks/bench_finetune.py --models 1 --runs base --demo-dir DIR  # one run of another demo
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def plain_loop_seconds(model_dir: Path, data_path: Path, steps: int, learning_rate: float, batch_size: int,
                       threads: int) -> float:
    """The same fine-tune as a hand-written loop: the baseline of the Trainer's training loop."""
    # ckpt_stability first: it hides CUDA builds of torchvision beside a CPU torch (torch_builds)
    from ckpt_stability.backends.transformers import no_progress_bars
    from ckpt_stability.finetune import IGNORED_LABEL, _tokenize
    from ckpt_stability.instruction_data import read_instruction_data

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    features = _tokenize(tokenizer, read_instruction_data(data_path), True, model.config.max_position_embeddings)
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORED_LABEL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    order = torch.randperm(len(features)).tolist()
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        batch = collate([features[order[(step * batch_size + i) % len(order)]] for i in range(batch_size)])
        model(**batch).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=3, help="checkpoints fine-tuned per run")
    parser.add_argument("--demo", action="store_true", help="pretrain the demo's runs first (in a temporary folder)")
    parser.add_argument("--demo-dir", type=Path, default=ROOT / "results" / "demo",
                        help="the demo's directory when not --demo (default %(default)s)")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    parser.add_argument("--runs", nargs="+", choices=sorted(config["runs"]), default=list(config["runs"]),
                        help="the demo runs to fine-tune (default: all)")
    args = parser.parse_args()
    finetune = config["finetune"]
    recipe = finetune["recipe"]
    with tempfile.TemporaryDirectory() as scratch:
        demo = args.demo_dir
        if args.demo:
            demo = Path(scratch) / "demo"
            subprocess.run([sys.executable, "-m", "ckpt_stability", "demo", "data", "--output", str(demo)], check=True)
            for size in args.runs:
                subprocess.run([sys.executable, "-m", "ckpt_stability", "demo", "train", "--data", str(demo),
                                "--size", size, "--output", str(demo / size)], check=True)
        data = demo / "finetune" / "train" / Path(finetune["data"]).name
        if not data.is_file():
            sys.exit(f"{data}: missing; run `snakemake` (the demo) first, or pass --demo")
        print(f"recipe: {recipe}; {finetune['threads']} thread(s) per fine-tune; data {data}")
        print(f"{'run':6} {'checkpoint':>14} {'process s':>10} {'fine-tune s':>12} {'plain loop s':>13}")
        for run in args.runs:
            checkpoints = sorted((demo / run).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            chosen = checkpoints[len(checkpoints) - 1::-max(1, len(checkpoints) // args.models)][: args.models]
            walls, inner, plain = [], [], []
            for checkpoint in chosen:
                output = Path(scratch) / f"{run}-{checkpoint.name}"
                command = [sys.executable, "-m", "ckpt_stability", "finetune", "--model", str(checkpoint), "--data",
                           str(data), "--output", str(output), "--record", f"{output}.json",
                           "--threads", str(finetune["threads"]),
                           *(f"--{key.replace('_', '-')}={value}" for key, value in recipe.items() if key != "lora"),
                           *(f"--lora-{key}={value}" for key, value in recipe.get("lora", {}).items())]
                started = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                walls.append(time.perf_counter() - started)
                inner.append(json.loads(Path(f"{output}.json").read_text())["seconds"])
                plain.append(plain_loop_seconds(checkpoint, data, recipe["steps"], recipe["learning_rate"],
                                                recipe["batch_size"], finetune["threads"]))
                print(f"{run:6} {checkpoint.name:>14} {walls[-1]:10.2f} {inner[-1]:12.2f} {plain[-1]:13.2f}")
            print(f"{run:6} {'mean':>14} {sum(walls) / len(walls):10.2f} {sum(inner) / len(inner):12.2f} "
                  f"{sum(plain) / len(plain):13.2f}")


if __name__ == "__main__":
    main()
