"""Benchmark: ``ckpt-stability average`` against mergekit's linear merge on the same inputs.

Builds (or reuses) N synthetic bf16 Llama checkpoints of about SIZE MB each, at steps 1000, 2000, ..., then runs,
each as a fresh subprocess, ``cat`` over the inputs (the page-cache read throughput, a floor), ``ckpt-stability
average`` and ``mergekit-yaml`` with ``merge_method: linear, dtype: float32, out_dtype: bfloat16``.
Prints wall time and peak RSS (``/usr/bin/time`` of each child), then compares both outputs with each
other and with the fp32-accumulated mean ``((x_1.float() + ... + x_n.float()) / n).to(bfloat16)``
computed here with torch.

The weighted schemes (issue #26) are timed in the same run, interleaved round by round with the uniform mean so
that a busy machine slows them alike: ``--scheme wsm --shape 1-sqrt`` and ``--scheme ema --half-life H`` (default
H: half the window's step span), and the uniform mean with ``--diagnostics`` (the weight distances, a second pass
over each chunk). Each weighted output is compared with its definition, computed here with torch: every c_j
rounded to float32, each product c_j x_j rounded to float32, summed left to right in float32, one cast to
bfloat16. With mergekit, its linear merge is timed with the same coefficients (``weight: c_j``, ``normalize:
false``); mergekit 0.1.5 accumulates with ``result.addcmul_(x_j, c_j)``, which torch's AVX2 and AVX-512 kernels
compute as a fused multiply-add (one rounding per term instead of two), so its result is compared with that
arithmetic (``torch.addcmul_`` here) and, run once more with ``ATEN_CPU_CAPABILITY=default`` (torch's portable
kernels: product rounded, then sum), bit for bit with ours. --uniform-only leaves all of this out.

mergekit lives in its own virtual environment, benchmarks/.venv-mergekit, created on the first run
(torch==2.13.0 first, the CPU build, then mergekit), so that it cannot disturb the project's. --ours-only
leaves mergekit out (nothing is installed): ``cat`` and ``ckpt-stability average`` are timed and our outputs
are compared with their definitions; the tests run it so, since the install takes about 40 s and 1.6 GB.

--dcp also saves the inputs with ``torch.distributed.checkpoint.save`` (one process, Hugging Face names) and
times ``ckpt-stability average --assets`` reading them in place, against the safetensors path; its output is
checked against the fp32-accumulated mean like the others.

    python benchmarks/bench_averaging.py                          # 8 x ~1 GB
    python benchmarks/bench_averaging.py --count 4 --size-mb 420 --ours-only --dcp  # DCP read in place
    python benchmarks/bench_averaging.py --count 4 --size-mb 420  # the issue's reference case
    python benchmarks/bench_averaging.py --count 2 --size-mb 100 --repeat 1              # a quick check
    python benchmarks/bench_averaging.py --count 2 --size-mb 100 --repeat 1 --ours-only  # quicker, no mergekit
    python benchmarks/bench_averaging.py --count 4 --size-mb 420 --uniform-only  # as before issue #26
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
    parser.add_argument("--uniform-only", action="store_true",
                        help="leave the weighted schemes (wsm, ema) and --diagnostics out")
    parser.add_argument("--half-life", type=float,
                        help="ema's half-life in steps (default: half the window's step span)")
    args = parser.parse_args()

    mergekit_yaml = None if args.ours_only else ensure_mergekit()
    inputs = make_checkpoints(args.workdir / f"bf16-{args.count}x{args.size_mb}MB", args.count, args.size_mb)
    files = [path / "model.safetensors" for path in inputs]
    total = sum(file.stat().st_size for file in files)
    print(f"inputs: {args.count} bf16 checkpoints, {total / args.count / 1e6:.0f} MB each "
          f"({parameter_count(inputs[0]) / 1e6:.0f} M parameters), in {inputs[0].parent}", flush=True)

    steps = [int(path.name.rsplit("-", 1)[1]) for path in inputs]
    schemes = {} if args.uniform_only else weighted_schemes(steps, args.half_life)
    for label, (scheme, coefficients) in schemes.items():
        print(f"{label}: steps {' '.join(map(str, steps))}, c_j = "
              f"{', '.join(f'{c:.4f}' for c in coefficients)}", flush=True)

    ours_out, mergekit_out = args.workdir / "out-ckpt-stability", args.workdir / "out-mergekit"
    ours_cmd = [str(PROJECT_BIN / "ckpt-stability"), "average", "--output", str(ours_out),
                *map(str, inputs)]
    diagnostics_file = args.workdir / "diagnostics.json"
    runs = {OURS: (ours_cmd, ours_out)}  # label -> (command, output directory), timed round by round
    checks = {OURS: MEAN}  # label -> what its output must be bit-identical to
    for label, (scheme, coefficients) in schemes.items():
        out = args.workdir / f"out-ckpt-stability-{scheme[0]}"
        runs[ours_label(label)] = ([*ours_cmd[:2], "--scheme", *scheme, "--steps", *map(str, steps),
                                    "--output", str(out), *map(str, inputs)], out)
        checks[ours_label(label)] = (OUR_SUM, label)
    if schemes:
        out = args.workdir / "out-ckpt-stability-diagnostics"
        runs[DIAGNOSTICS] = ([*ours_cmd[:2], "--diagnostics", str(diagnostics_file), "--output", str(out),
                              *map(str, inputs)], out)
        checks[DIAGNOSTICS] = MEAN

    timed(["cat", *map(str, files)], stdout=subprocess.DEVNULL)  # warm the page cache
    cat = best(args.repeat, lambda: timed(["cat", *map(str, files)], stdout=subprocess.DEVNULL))
    results = {"cat (page cache)": cat}
    results.update(best_of_rounds(args.repeat, {
        label: (lambda command=command, out=out: timed(command, clear=out, also_clear=diagnostics_file))
        for label, (command, out) in runs.items()}))
    outputs = {label: out for label, (_, out) in runs.items()}
    pairs = []  # (label, label): the elements where the two outputs differ
    untimed = {}  # mergekit without FMA: run once, for the bit-identity check
    if mergekit_yaml:
        offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
        merges = {MERGEKIT: (None, mergekit_out)}
        checks[MERGEKIT] = MEAN
        for label, (scheme, coefficients) in schemes.items():
            merges[mergekit_label(label)] = (coefficients, args.workdir / f"out-mergekit-{scheme[0]}")
            checks[mergekit_label(label)] = (FMA_SUM, label)
            pairs.append((ours_label(label), mergekit_label(label)))
        commands = {}
        for label, (coefficients, out) in merges.items():
            config = args.workdir / f"mergekit{out.name.removeprefix('out-mergekit')}.yml"
            config.write_text(mergekit_config(inputs, coefficients))
            commands[label] = ([str(mergekit_yaml), str(config), str(out), "--quiet", "--no-write-model-card",
                                "--no-copy-tokenizer"], out)
        results.update(best_of_rounds(args.repeat, {
            label: (lambda command=command, out=out: timed(command, clear=out, env=offline))
            for label, (command, out) in commands.items()}))
        outputs.update({label: out for label, (_, out) in commands.items()})
        for label in schemes:
            command, out = commands[mergekit_label(label)]
            portable = out.with_name(out.name + "-no-fma")
            untimed[no_fma_label(label)] = timed([*command[:2], str(portable), *command[3:]], clear=portable,
                                                 env={**offline, "ATEN_CPU_CAPABILITY": "default"})
            outputs[no_fma_label(label)] = portable
            checks[no_fma_label(label)] = (OUR_SUM, label)
            pairs.append((ours_label(label), no_fma_label(label)))
    if args.dcp:
        dcp_inputs = save_as_dcp(inputs)
        dcp_out = args.workdir / "out-ckpt-stability-dcp"
        dcp_cmd = [*ours_cmd[:3], str(dcp_out), "--assets", str(inputs[-1]), *map(str, dcp_inputs)]
        timed(["cat", *(str(file) for path in dcp_inputs for file in path.iterdir())], stdout=subprocess.DEVNULL)
        results[DCP_LABEL] = best(args.repeat, lambda: timed(dcp_cmd, clear=dcp_out))
        outputs[DCP_LABEL] = dcp_out
        checks[DCP_LABEL] = MEAN

    width = max(map(len, results)) + 2
    print(f"\n{'':{width}}{'wall s':>9}{'peak RSS MB':>13}")
    for label, (seconds, rss) in results.items():
        print(f"{label:{width}}{seconds:9.2f}{rss / 1e6:13.0f}   {total / seconds / 1e9:.1f} GB/s read")
    for label, (seconds, rss) in untimed.items():
        print(f"({label}: {seconds:.2f} s, {rss / 1e6:.0f} MB, run once for the bit-identity check)")
    ours = results[OURS]
    if mergekit_yaml:
        mergekit = results[MERGEKIT]
        print(f"speed-up {mergekit[0] / ours[0]:.1f}x (goal >= 3x); peak RSS {ours[1] / mergekit[1]:.1%} of "
              f"mergekit's (goal <= 25%)", flush=True)
    for label in schemes:
        weighted = results[ours_label(label)]
        print(f"{label}: {weighted[0] / ours[0]:.2f}x the uniform mean's time (goal <= 1.1x), peak RSS "
              f"{weighted[1] / 1e6:.0f} MB against {ours[1] / 1e6:.0f} MB", flush=True)
        if mergekit_yaml:
            merged = results[mergekit_label(label)]
            print(f"{label}: speed-up {merged[0] / weighted[0]:.1f}x over mergekit linear with the same weights "
                  f"(goal >= 3x; uniform: {mergekit[0] / ours[0]:.1f}x); peak RSS {weighted[1] / merged[1]:.1%} "
                  f"of mergekit's (goal <= 25%; uniform: {ours[1] / mergekit[1]:.1%})", flush=True)
    if schemes:
        with_diagnostics = results[DIAGNOSTICS]
        print(f"diagnostics: uniform with --diagnostics {with_diagnostics[0] / ours[0]:.2f}x the time without, "
              f"peak RSS {with_diagnostics[1] / 1e6:.0f} MB against {ours[1] / 1e6:.0f} MB; "
              f"{diagnostics_file.name} {diagnostics_file.stat().st_size / 1e3:.1f} kB", flush=True)
    if args.dcp:
        dcp = results[DCP_LABEL]
        print(f"DCP read in place: {dcp[0] / ours[0]:.2f}x the safetensors path's time (goal <= 1.5x), peak RSS "
              f"{dcp[1] / 1e6:.0f} MB against {ours[1] / 1e6:.0f} MB", flush=True)
    compare(inputs, outputs, checks, {label: coefficients for label, (_, coefficients) in schemes.items()}, pairs)


OURS, MERGEKIT, DIAGNOSTICS = "ckpt-stability average", "mergekit linear", "ckpt-stability average --diagnostics"
MEAN, OUR_SUM, FMA_SUM = "the fp32-accumulated mean", "ours", "fma"


def ours_label(scheme: str) -> str:
    return f"ckpt-stability {scheme}"


def mergekit_label(scheme: str) -> str:
    return f"mergekit linear, {scheme} weights"


def no_fma_label(scheme: str) -> str:
    return f"mergekit linear, {scheme} weights, ATEN_CPU_CAPABILITY=default"


def weighted_schemes(steps: list[int], half_life: float | None) -> dict[str, tuple[list[str], list[float]]]:
    """label -> (the ``average`` options, the coefficients c_j) of the weighted schemes timed."""
    from ckpt_stability.averaging_schemes import Scheme

    half_life = half_life or (steps[-1] - steps[0]) / 2
    schemes = {}
    for options, scheme in ((["wsm", "--shape", "1-sqrt"], Scheme("wsm", shape="1-sqrt")),
                            (["ema", "--half-life", repr(half_life)], Scheme("ema", half_life=half_life))):
        schemes[scheme.description] = (options, scheme.coefficients(steps))
    return schemes


def mergekit_config(inputs: list[Path], coefficients: list[float] | None) -> str:
    """mergekit-yaml's linear merge of ``inputs``: with ``coefficients``, their weighted sum (no normalisation);
    without, their mean (weight 1, normalised)."""
    text = "merge_method: linear\ndtype: float32\nout_dtype: bfloat16\n"
    if coefficients is not None:
        text += "parameters:\n  normalize: false\n"
    weights = coefficients or [1.0] * len(inputs)
    # 17 significant digits give the float64 back; the form d.ddde-XX is a float to YAML 1.1 (1e-05 is a string)
    return text + "models:\n" + "".join(f"  - model: {path}\n    parameters:\n      weight: {weight:.16e}\n"
                                         for path, weight in zip(inputs, weights))


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
    """``count`` bf16 Llama checkpoints of about ``size_mb`` MB, random weights; reused when present.

    One layer and a vocabulary of 32,000 take 156 MB; below that the vocabulary is cut (to 1,024 at least, 29 MB)."""
    paths = [root / f"checkpoint-{1000 * (number + 1)}" for number in range(count)]
    if all(incomplete_reason(path) is None for path in paths):
        return paths
    # imported after ckpt_stability, which hides CUDA builds of torchvision beside a CPU torch (torch_builds)
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate = 1024, 2816
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    vocab = min(32000, max(1024, round((size_mb * 1e6 / 2 - per_layer - hidden) / (2 * hidden))))
    layers = max(1, round((size_mb * 1e6 / 2 - 2 * vocab * hidden - hidden) / per_layer))
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                         tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {name: tuple(tensor.shape) for name, tensor in LlamaForCausalLM(config).state_dict().items()}
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


def timed(command: list[str], clear: Path | None = None, also_clear: Path | None = None,
          **popen) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of ``command`` run as a fresh child; it must succeed. ``clear``: a
    directory, ``also_clear``: a file removed first.

    The peak RSS comes from /usr/bin/time: a child forked from this (large) process would report
    this process's RSS as its own peak, since Linux carries the high-water mark across exec."""
    if clear is not None:
        shutil.rmtree(clear, ignore_errors=True)
    if also_clear is not None:
        also_clear.unlink(missing_ok=True)
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


def best_of_rounds(repeat: int, measures: dict) -> dict[str, tuple[float, int]]:
    """``best`` of each of ``measures`` (label -> measure), run in ``repeat`` rounds of one run each, so that
    the load of a shared machine falls on all of them alike."""
    runs = {label: [] for label in measures}
    for _ in range(repeat):
        for label, measure in measures.items():
            runs[label].append(measure())
    return {label: (min(seconds for seconds, _ in done), max(rss for _, rss in done)) for label, done in runs.items()}


def compare(inputs: list[Path], output_dirs: dict[str, Path], checks: dict, coefficients: dict[str, list[float]],
            pairs: list[tuple[str, str]]) -> None:
    """Bit-identity of each output with what ``checks`` names for it, tensor by tensor: ``MEAN``, the
    fp32-accumulated mean; ``(OUR_SUM, scheme)``, our weighted definition with that scheme's coefficients;
    ``(FMA_SUM, scheme)``, mergekit's accumulation ``result.addcmul_(x_j, c_j)`` from zeros. Then, with mergekit,
    max |ours - mergekit| for the uniform mean, and for each of ``pairs`` the elements where the two differ."""
    members = [tensor_files(path) for path in inputs]
    outputs = {tool: tensor_files(directory) for tool, directory in output_dirs.items()}
    identical = dict.fromkeys(outputs, True)
    max_diff = 0.0
    differing = {pair: [0, 0.0] for pair in pairs}  # elements that differ, max |difference|
    elements = 0
    for name in sorted(members[-1]):
        values = [member[name].get_tensor(name).float() for member in members]
        elements += values[0].numel()
        acc = values[0]
        for value in values[1:]:
            acc = acc + value
        references = {MEAN: (acc / len(members)).to(torch.bfloat16)}
        for scheme, weights in coefficients.items():
            weights = [torch.tensor(c, dtype=torch.float32) for c in weights]  # c_j rounded to float32
            acc = weights[0] * values[0]
            for weight, value in zip(weights[1:], values[1:]):
                acc = acc + weight * value  # the product rounded, then the sum
            references[OUR_SUM, scheme] = acc.to(torch.bfloat16)
            acc = torch.zeros_like(values[0])
            for weight, value in zip(weights, values):
                acc.addcmul_(value, weight)  # as mergekit 0.1.5's linear merge
            references[FMA_SUM, scheme] = acc.to(torch.bfloat16)
        got = {tool: files[name].get_tensor(name) for tool, files in outputs.items()}
        for tool, tensor in got.items():
            reference = references[checks[tool]]
            identical[tool] &= tensor.dtype == torch.bfloat16 and torch.equal(
                tensor.view(torch.int16), reference.view(torch.int16))
        if MERGEKIT in got:
            max_diff = max(max_diff, (got[OURS].float() - got[MERGEKIT].float()).abs().max().item())
        for first, second in pairs:
            unequal = got[first].view(torch.int16) != got[second].view(torch.int16)
            differing[first, second][0] += int(unequal.sum())
            differing[first, second][1] = max(differing[first, second][1], (
                got[first].float() - got[second].float()).abs().max().item())
    if MERGEKIT in outputs:
        print(f"max |ckpt-stability - mergekit| = {max_diff:g}")
    for (first, second), (count, largest) in differing.items():
        print(f"{first} against {second}: {count} of {elements} elements differ ({count / elements:.4%}), "
              f"max |difference| = {largest:g}")
    for tool, same in identical.items():
        print(f"{tool}: {'bit-identical to' if same else 'DIFFERS from'} {definition(checks[tool])}")


def definition(check) -> str:
    """In words, what ``compare`` checks an output against."""
    if check == MEAN:
        return MEAN
    kind, scheme = check
    if kind == OUR_SUM:
        return f"ckpt-stability's {scheme} sum (c_j to float32; each product, then each sum rounded to float32)"
    return f"the {scheme} sum by fused multiply-adds (torch addcmul_ on this CPU, as mergekit computes it)"


def tensor_files(directory: Path) -> dict:
    """tensor name -> the open safetensors file holding it, over a model directory's weight files."""
    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    handles = [safe_open(directory / file, "pt") for file in files]
    return {name: handle for handle in handles for name in handle.keys()}


if __name__ == "__main__":
    main()
