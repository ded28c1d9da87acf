"""Benchmark: the disk that converted checkpoints take while the workflow runs a run in its trainer's format.

Writes a run of N torch.distributed checkpoints (a 4-layer Llama with noise added per step, about SIZE MB
each as float32) and runs the workflow on it with `snakemake --cores C`, converting every checkpoint with
torch's own converter (``dcp_to_torch``) and averaging over the given windows, one tiny task evaluated per
model. While it runs, ``results/converted/`` is sampled every 50 ms: the peak of its size and of the
conversions present at once, against the total of all conversions. The goal: at most (largest window +
concurrent jobs) checkpoints' worth at once, whatever N (the conversions of each run's last
(largest window - 1) checkpoints are kept for the next ones; the others are deleted once read).

    python benchmarks/bench_conversion.py                                  # 30 checkpoints, windows 1 2 4 8
    python benchmarks/bench_conversion.py --checkpoints 6 --windows 1 2    # a quick check
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from ckpt_stability.demo import DemoSettings, write_data

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=30, help="checkpoints in the run (default 30)")
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8], help="default: 1 2 4 8")
    parser.add_argument("--hidden-size", type=int, default=256, help="of the model (default 256: about 16 MB)")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores (default 2)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_conversion"),
                        help="replaced on every run (default %(default)s)")
    args = parser.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    native, assets = make_run(args.workdir, args.checkpoints, args.hidden_size)
    one = sum(path.stat().st_size for path in (native / "iter_0000001").iterdir())
    print(f"run: {args.checkpoints} DCP checkpoints of {one / 1e6:.1f} MB, windows {args.windows}, "
          f"snakemake --cores {args.cores}", flush=True)
    converter = (f"{shlex.quote(sys.executable)} -m torch.distributed.checkpoint.format_utils dcp_to_torch {{src}} "
                 f"{{out}}/pytorch_model.bin && cp {shlex.quote(str(assets))}/* {{out}}/")
    config = {
        "runs": {"native": {"path": f"{native}/iter_{{step}}", "format": "dcp", "convert": converter}},
        "windows": args.windows, "methods": ["avg"], "final_fraction": 0.2, "backend": "transformers",
        "tasks": {"demo_colors": {"path": str(args.workdir / "data" / "tasks" / "demo_colors.json"),
                                  "category": "MC", "mode": "choice", "num_fewshot": 1, "max_samples": 2}},
    }
    (args.workdir / "config.yaml").write_text(yaml.safe_dump(config))

    converted = args.workdir / "results" / "converted"
    sampler = PeakSampler(converted)
    sampler.start()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory",
                           str(args.workdir), "--configfile", str(args.workdir / "config.yaml"), "--cores",
                           str(args.cores)], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    sampler.stop()
    if done.returncode != 0:
        sys.exit(f"the workflow failed:\n{done.stderr[-3000:]}")
    conversion = sampler.largest_conversion
    total = args.checkpoints * conversion
    goal = max(args.windows) + args.cores
    print(f"\nworkflow: {seconds:.0f} s; {len(list(converted.glob('native/step*')))} conversions kept at the end")
    print(f"one conversion:            {conversion / 1e6:8.1f} MB")
    print(f"all {args.checkpoints} conversions:      {total / 1e6:8.1f} MB")
    print(f"peak on disk at once:      {sampler.peak_bytes / 1e6:8.1f} MB = {sampler.peak_bytes / conversion:.1f} "
          f"conversions ({sampler.peak_count} directories), {sampler.peak_bytes / total:.0%} of all "
          f"(goal <= largest window + cores = {goal})")


class PeakSampler(threading.Thread):
    """The largest size of ``directory`` (every file under it, temporary ones included), the most conversion
    directories in it at once, and the largest finished conversion, sampled every 50 ms."""

    def __init__(self, directory: Path) -> None:
        super().__init__(daemon=True)
        self.directory = directory
        self.peak_bytes = self.peak_count = self.largest_conversion = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            size, count = 0, 0
            for root, directories, files in os.walk(self.directory):
                count += sum(name.startswith(("step", ".step")) for name in directories)
                here = 0
                for name in files:
                    try:
                        here += os.stat(os.path.join(root, name)).st_size
                    except FileNotFoundError:  # deleted while walking
                        pass
                size += here
                if Path(root).name.startswith("step"):  # a finished conversion (temporary ones start with ".")
                    self.largest_conversion = max(self.largest_conversion, here)
            self.peak_bytes, self.peak_count = max(self.peak_bytes, size), max(self.peak_count, count)

    def stop(self) -> None:
        self.done.set()
        self.join()


def make_run(workdir: Path, count: int, hidden_size: int) -> tuple[Path, Path]:
    """``count`` DCP checkpoints iter_0000001 ... of one Llama with noise added per step, the demo's tasks, and the
    directory of the run's config.json and tokenizer."""
    # imported after ckpt_stability (above), which hides CUDA builds of torchvision beside a CPU torch
    import torch
    import torch.distributed.checkpoint as dcp
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    settings = DemoSettings(samples_per_task=8, vocab_size=400, heldout_documents=5, tokenizer_documents=300)
    write_data(workdir / "data", settings)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "data" / "tokenizer")
    assets = workdir / "hf assets"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=4, num_attention_heads=hidden_size // 32, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    weights = LlamaForCausalLM(config).state_dict()
    config.save_pretrained(assets)
    tokenizer.save_pretrained(assets)
    native = workdir / "native run"
    for step in range(1, count + 1):
        state = {name: tensor + 1e-3 * step * torch.randn_like(tensor) for name, tensor in weights.items()}
        dcp.save(state, checkpoint_id=native / f"iter_{step:07d}", no_dist=True)
    return native, assets


if __name__ == "__main__":
    main()
