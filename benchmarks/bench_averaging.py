"""Benchmark: ``ckpt-stability average`` against mergekit's linear merge on the same inputs.

Builds (or reuses) N synthetic bf16 Llama checkpoints of about SIZE MB each, then runs, each as a
fresh subprocess, ``cat`` over the inputs (the page-cache read throughput, a floor), ``ckpt-stability
average`` and ``mergekit-yaml`` with ``merge_method: linear, dtype: float32, out_dtype: bfloat16``.
Prints wall time and peak RSS (``/usr/bin/time`` of each child), then compares both outputs with each
other and with the fp32-accumulated mean ``((x_1.float() + ... + x_n.float()) / n).to(bfloat16)``
computed here with torch.

mergekit lives in its own virtual environment, benchmarks/.venv-mergekit, created on the first run
(torch==2.13.0 first, the CPU build, then mergekit), so that it cannot disturb the project's. --ours-only
leaves mergekit out (nothing is installed): ``cat`` and ``ckpt-stability average`` are timed and our output
is compared with the fp32-accumulated mean; the tests run it so, since the install takes about 40 s and
1.6 GB.

--dcp also saves the inputs with ``torch.distributed.checkpoint.save`` (one process, Hugging Face names) and
times ``ckpt-stability average --assets`` reading them in place, against the safetensors path; its output is
checked against the fp32-accumulated mean like the others.

    python benchmarks/bench_averaging.py                          # 8 x ~1 GB
    python benchmarks/bench_averaging.py --count 4 --size-mb 420 --ours-only --dcp  # DCP read in place
    python benchmarks/bench_averaging.py --count 4 --size-mb 420  # the issue's reference case
    python benchmarks/bench_averaging.py --count 2 --size-mb 100 --repeat 1              # a quick check
    python benchmarks/bench_averaging.py --count 2 --size-mb 100 --repeat 1 --ours-only  # quicker, no mergekit
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ckpt_stability.checkpoints import incomplete_reason

HERE = Path(__file__).resolve().parent
MERGEKIT_VENV = HERE / ".venv-mergekit"
PROJECT_BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=8, help="number of checkpoints (default 8)")
    parser.add_argument("--size-mb", type=int, default=1000, help="approximate size of each, MB (default 1000)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_averaging"),
                        help="inputs are kept here between runs, outputs are replaced (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each tool; the best is reported")
    parser.add_argument("--ours-only", action="store_true",
                        help="leave mergekit out (not installed, not run): time and check ckpt-stability alone")
    parser.add_argument("--dcp", action="store_true",
                        help="also average the inputs saved as torch.distributed checkpoints, read in place")
    args = parser.parse_args()

    mergekit_yaml = None if args.ours_only else ensure_mergekit()
    inputs = make_checkpoints(args.workdir / f"bf16-{args.count}x{args.size_mb}MB", args.count, args.size_mb)
    files = [path / "model.safetensors" for path in inputs]
    total = sum(file.stat().st_size for file in files)
    print(f"inputs: {args.count} bf16 checkpoints, {total / args.count / 1e6:.0f} MB each "
          f"({parameter_count(inputs[0]) / 1e6:.0f} M parameters), in {inputs[0].parent}", flush=True)

    ours_out, mergekit_out = args.workdir / "out-ckpt-stability", args.workdir / "out-mergekit"
    ours_cmd = [str(PROJECT_BIN / "ckpt-stability"), "average", "--output", str(ours_out),
                *map(str, inputs)]

    timed(["cat", *map(str, files)], stdout=subprocess.DEVNULL)  # warm the page cache
    cat = best(args.repeat, lambda: timed(["cat", *map(str, files)], stdout=subprocess.DEVNULL))
    ours = best(args.repeat, lambda: timed(ours_cmd, clear=ours_out))
    results = {"cat (page cache)": cat, "ckpt-stability average": ours}
    outputs = {"ckpt-stability average": ours_out}
    if mergekit_yaml:
        mergekit_config = args.workdir / "mergekit.yml"
        mergekit_config.write_text(
            "merge_method: linear\ndtype: float32\nout_dtype: bfloat16\nmodels:\n"
            + "".join(f"  - model: {path}\n    parameters:\n      weight: 1.0\n" for path in inputs))
        mergekit_cmd = [str(mergekit_yaml), str(mergekit_config), str(mergekit_out), "--quiet",
                        "--no-write-model-card", "--no-copy-tokenizer"]
        results["mergekit linear"] = best(args.repeat, lambda: timed(mergekit_cmd, clear=mergekit_out,
                                                                     env={**os.environ, "HF_HUB_OFFLINE": "1"}))
        outputs["mergekit linear"] = mergekit_out
    if args.dcp:
        dcp_inputs = save_as_dcp(inputs)
        dcp_out = args.workdir / "out-ckpt-stability-dcp"
        dcp_cmd = [*ours_cmd[:3], str(dcp_out), "--assets", str(inputs[-1]), *map(str, dcp_inputs)]
        timed(["cat", *(str(file) for path in dcp_inputs for file in path.iterdir())], stdout=subprocess.DEVNULL)
        results[DCP_LABEL] = best(args.repeat, lambda: timed(dcp_cmd, clear=dcp_out))
        outputs[DCP_LABEL] = dcp_out

    print(f"\n{'':28}{'wall s':>9}{'peak RSS MB':>13}")
    for label, (seconds, rss) in results.items():
        print(f"{label:28}{seconds:9.2f}{rss / 1e6:13.0f}   {total / seconds / 1e9:.1f} GB/s read")
    if mergekit_yaml:
        mergekit = results["mergekit linear"]
        print(f"speed-up {mergekit[0] / ours[0]:.1f}x (goal >= 3x); peak RSS {ours[1] / mergekit[1]:.1%} of "
              f"mergekit's (goal <= 25%)", flush=True)
    if args.dcp:
        dcp = results[DCP_LABEL]
        print(f"DCP read in place: {dcp[0] / ours[0]:.2f}x the safetensors path's time (goal <= 1.5x), peak RSS "
              f"{dcp[1] / 1e6:.0f} MB against {ours[1] / 1e6:.0f} MB", flush=True)
    compare(inputs, outputs)


def ensure_mergekit() -> Path:
    """mergekit-yaml in its own venv, created on first use (CPU torch pinned first)."""
    executable = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if not executable.exists():
        print(f"installing mergekit into {MERGEKIT_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
        pip = str(MERGEKIT_VENV / "bin" / "pip")
        subprocess.run([pip, "install", "--quiet", "torch==2.13.0"], check=True)
        subprocess.run([pip, "install", "--quiet", "mergekit"], check=True)
    # keep its 1.6 GB out of git even before .gitignore lists it (as Python 3.13's venv does)
    (MERGEKIT_VENV / ".gitignore").write_text("*\n")
    return executable


def make_checkpoints(root: Path, count: int, size_mb: int) -> list[Path]:
    """``count`` bf16 Llama checkpoints of about ``size_mb`` MB, random weights; reused when present."""
    # imported after ckpt_stability, which hides CUDA builds of torchvision beside a CPU torch (torch_builds)
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, vocab = 1024, 2816, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    layers = max(1, round((size_mb * 1e6 / 2 - 2 * vocab * hidden - hidden) / per_layer))
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                         tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {name: tuple(tensor.shape) for name, tensor in LlamaForCausalLM(config).state_dict().items()}
    paths = [root / f"checkpoint-{1000 * (number + 1)}" for number in range(count)]
    for seed, path in enumerate(paths):
        if incomplete_reason(path) is None:
            continue
        print(f"writing {path} ...", flush=True)
        rng = np.random.default_rng(seed)
        tensors = {}
        for name, shape in shapes.items():
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            if name.endswith("norm.weight"):
                values += np.float32(1)
            tensors[name] = torch.from_numpy(values).to(torch.bfloat16)
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(path)
    return paths


DCP_LABEL = "ckpt-stability average, DCP"


def save_as_dcp(inputs: list[Path]) -> list[Path]:
    """Each input saved by ``torch.distributed.checkpoint.save`` beside it (``dcp-<name>``); reused when present."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    paths = [path.with_name(f"dcp-{path.name}") for path in inputs]
    for source, path in zip(inputs, paths):
        if not (path / ".metadata").is_file():
            print(f"writing {path} ...", flush=True)
            dcp.save(load_file(source / "model.safetensors"), checkpoint_id=path, no_dist=True)
    return paths


def parameter_count(checkpoint: Path) -> int:
    with safe_open(checkpoint / "model.safetensors", "pt") as handle:
        return sum(int(np.prod(handle.get_slice(name).get_shape())) for name in handle.keys())


def timed(command: list[str], clear: Path | None = None, **popen) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of ``command`` run as a fresh child; it must succeed.

    The peak RSS comes from /usr/bin/time: a child forked from this (large) process would report
    this process's RSS as its own peak, since Linux carries the high-water mark across exec."""
    if clear is not None:
        shutil.rmtree(clear, ignore_errors=True)
    report = Path(tempfile.mkstemp(prefix="bench_averaging.", suffix=".time")[1])
    try:
        started = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), *command], check=True, **popen)
        seconds = time.perf_counter() - started
        return seconds, int(report.read_text().split()[-1]) * 1024  # %M is in KiB
    finally:
        report.unlink()


def best(repeat: int, measure) -> tuple[float, int]:
    """The shortest wall time and the largest peak RSS over ``repeat`` runs."""
    runs = [measure() for _ in range(repeat)]
    return min(seconds for seconds, _ in runs), max(rss for _, rss in runs)


def compare(inputs: list[Path], output_dirs: dict[str, Path]) -> None:
    """Bit-identity of each tool's output with the fp32-accumulated mean, tensor by tensor, and with two tools the
    max |ours - mergekit|."""
    members = [tensor_files(path) for path in inputs]
    outputs = {tool: tensor_files(directory) for tool, directory in output_dirs.items()}
    identical = dict.fromkeys(outputs, True)
    max_diff = 0.0
    for name in sorted(members[-1]):
        acc = members[0][name].get_tensor(name).float()
        for member in members[1:]:
            acc = acc + member[name].get_tensor(name).float()
        reference = (acc / len(members)).to(torch.bfloat16)
        got = {tool: files[name].get_tensor(name) for tool, files in outputs.items()}
        for tool, tensor in got.items():
            identical[tool] &= tensor.dtype == torch.bfloat16 and torch.equal(
                tensor.view(torch.int16), reference.view(torch.int16))
        if "mergekit linear" in got:
            max_diff = max(max_diff, (got["ckpt-stability average"].float() - got["mergekit linear"].float())
                           .abs().max().item())
    if "mergekit linear" in outputs:
        print(f"max |ckpt-stability - mergekit| = {max_diff:g}")
    for tool, same in identical.items():
        print(f"{tool}: {'bit-identical to' if same else 'DIFFERS from'} the fp32-accumulated mean")


def tensor_files(directory: Path) -> dict:
    """tensor name -> the open safetensors file holding it, over a model directory's weight files."""
    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    handles = [safe_open(directory / file, "pt") for file in files]
    return {name: handle for handle in handles for name in handle.keys()}


if __name__ == "__main__":
    main()
