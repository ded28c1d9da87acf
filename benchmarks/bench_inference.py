"""Few-shot choice scoring: `ckpt-stability evaluate` against lm-evaluation-harness, same run, same data.

Both score the same llm-jp-eval choice task (by default the demo's NLI task) on the same checkpoint
(by default the demo's last one), with the same prompts: the prompts are rendered once by this
project's template and handed to lm-eval as the documents' text (num_fewshot 0 on lm-eval's side, the
few-shot examples being inside the text), with an empty target delimiter so that each choice is scored
right after the prompt. Each tool runs as a fresh process, so start-up counts as it does for a
workflow job. Prints the wall time and throughput (examples/s) of both, their ratio, and the share of
examples on which both predict the same label. Goals (issue #4): >= 99% identical predictions, and
our throughput at least 2x lm-eval's.

lm-eval (PyPI `lm-eval`, HF backend) is installed into its own venv, benchmarks/.venv-lmeval, on first
use (torch 2.13.0 first, so that pip takes the local CPU build). --ours-only leaves lm-eval out (nothing is
installed) and times `ckpt-stability evaluate` alone; the tests run it so, since the install takes about a
minute and 1.8 GB.

    python benchmarks/bench_inference.py                          # the demo's NLI task, last checkpoint
    python benchmarks/bench_inference.py --task tests/data/jglue/jnli.json --model results/demo/base/checkpoint-480
    python benchmarks/bench_inference.py --ours-only              # quicker: no lm-eval, no comparison
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LMEVAL_VENV = ROOT / "benchmarks" / ".venv-lmeval"


def lmeval_python() -> Path:
    python = LMEVAL_VENV / "bin" / "python"
    if not (LMEVAL_VENV / "bin" / "lm_eval").exists():
        print(f"installing lm-eval into {LMEVAL_VENV} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LMEVAL_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "lm-eval[hf]==0.4.13"], check=True)
    return python


def timed(command: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"{command[0]} failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - started


def write_lmeval_task(task, prompts: list[str], directory: Path) -> str:
    """A custom lm-eval task over the same samples, whose text is our rendered prompt."""
    rows = directory / "docs.jsonl"
    with open(rows, "w", encoding="utf-8") as handle:
        for index, (sample, prompt) in enumerate(zip(task.samples, prompts)):
            handle.write(json.dumps({"id": index, "prompt": prompt,
                                     "label": task.label_list.index(sample.output)}, ensure_ascii=False) + "\n")
    name = "ckpt_stability_bench"
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(rows)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": list(task.label_list),
        "doc_to_target": "{{label}}",
        "target_delimiter": "",
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc"}],
    }
    (directory / f"{name}.yaml").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "results/demo/base/checkpoint-480"))
    parser.add_argument("--task", default=str(ROOT / "results/demo/tasks/demo_nli.json"))
    parser.add_argument("--num-fewshot", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ours-only", action="store_true",
                        help="leave lm-eval out (not installed, not run): time ckpt-stability evaluate alone")
    args = parser.parse_args()

    from ckpt_stability.predictions import read_predictions
    from ckpt_stability.prompts import PromptTemplate
    from ckpt_stability.tasks import load_task

    model, task_file = Path(args.model).resolve(), Path(args.task).resolve()
    task = load_task(task_file, mode="choice", num_fewshot=args.num_fewshot)
    prompts = task.prompts(PromptTemplate())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        tmp = Path(tmp)
        ours = timed([sys.executable, "-m", "ckpt_stability", "evaluate", "--model", str(model), "--task",
                      str(task_file), "--mode", "choice", "--num-fewshot", str(args.num_fewshot),
                      "--backend", "transformers", "--batch-size", str(args.batch_size),
                      "--threads", str(args.threads), "--output-dir", str(tmp / "ours")], env)
        our_predictions = read_predictions(tmp / "ours" / f"{task_file.stem}.parquet").prediction
        examples = len(our_predictions)
        print(f"task {task_file.name}: {examples} examples, {args.num_fewshot}-shot, {len(task.label_list)} "
              f"choices; model {model}")
        print(f"{'tool':<24}{'wall s':>8}{'examples/s':>12}")
        print(f"{'ckpt-stability evaluate':<24}{ours:8.2f}{examples / ours:12.1f}")
        if args.ours_only:
            return

        name = write_lmeval_task(task, prompts, tmp)
        theirs = timed([str(lmeval_python()), "-m", "lm_eval", "--model", "hf", "--model_args",
                        f"pretrained={model},dtype=float32", "--device", "cpu", "--batch_size",
                        str(args.batch_size), "--tasks", name, "--include_path", str(tmp), "--log_samples",
                        "--output_path", str(tmp / "lmeval")], env)
        samples_file = next((tmp / "lmeval").rglob(f"samples_{name}_*.jsonl"))
        their_predictions = {}
        for line in samples_file.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            loglikelihoods = [float(response[0]) for response in record["filtered_resps"]]
            their_predictions[record["doc"]["id"]] = task.label_list[loglikelihoods.index(max(loglikelihoods))]

    same = sum(ours == their_predictions[i] for i, ours in enumerate(our_predictions))
    print(f"{'lm-eval (hf)':<24}{theirs:8.2f}{examples / theirs:12.1f}")
    print(f"throughput ratio (ours / lm-eval): {theirs / ours:.2f}x   (goal: >= 2x)")
    print(f"identical predictions: {same}/{examples} = {same / examples:.1%}   (goal: >= 99%)")


if __name__ == "__main__":
    main()
