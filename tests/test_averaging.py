"""ckpt_stability.averaging: exactness, loading with transformers, refusals, the CLI, bounded memory and
atomicity of ``ckpt-stability average``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import ckpt_stability
from ckpt_stability import averaging
from ckpt_stability.averaging import average_checkpoints
from ckpt_stability.weight_formats import read_header
from ckpt_stability.cli import main
from ckpt_stability.errors import InputError

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llama_config(tie: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)


def save_llama(path: Path, seed: int, dtype: str = "bfloat16", *, tie: bool = False,
               shard_size: str | None = None) -> Path:
    """A tiny random Llama saved like a training run's checkpoint (sharded when ``shard_size``)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tie)).to(TORCH_DTYPES[dtype])
    with torch.no_grad():  # norms start at exactly 1 in every seed: make them differ too
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(path, max_shard_size=shard_size or "1GB")
    return path


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A checkpoint directory holding exactly ``tensors``, written with safetensors directly."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
    return path


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def torch_mean(states: list[dict[str, torch.Tensor]], name: str, dtype: torch.dtype) -> torch.Tensor:
    """The definition, with torch: sum in float32 (float64 for float64) in member order, / n, cast."""
    wide = torch.float64 if states[0][name].dtype == torch.float64 else torch.float32
    acc = states[0][name].to(wide)
    for state in states[1:]:
        acc = acc + state[name].to(wide)
    return (acc / len(states)).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.view(torch.uint8).equal(b.view(torch.uint8))


@pytest.fixture(params=["default", "tiny"])
def chunk_elements(request, monkeypatch):
    """Run both with the real chunk size and with 7-element chunks, so tensors span many chunks."""
    if request.param == "tiny":
        monkeypatch.setattr(averaging, "CHUNK_ELEMENTS", 7)
    return averaging.CHUNK_ELEMENTS


@pytest.mark.parametrize(("dtype", "tie", "shard_sizes"), [
    ("float32", False, [None, None, None]),
    ("bfloat16", True, ["4KB", None, "4KB"]),
    ("bfloat16", False, [None, "4KB", None]),
    ("float16", False, ["4KB", "4KB", "4KB"]),
])
def test_mean_is_bitwise_torchs_fp32_mean_and_close_to_float64(tmp_path, chunk_elements, dtype, tie, shard_sizes):
    members = [save_llama(tmp_path / f"ckpt-{seed}", seed, dtype, tie=tie, shard_size=size)
               for seed, size in enumerate(shard_sizes)]
    summary = average_checkpoints(members, tmp_path / "avg", dtype=None, max_shard_size=10**9, steps=None)

    states = [load_weights(member) for member in members]
    result = load_weights(tmp_path / "avg")
    assert sorted(result) == sorted(states[-1])
    assert summary["tensors"] == len(result) and summary["files"] == ["model.safetensors"]
    if tie:
        assert "lm_head.weight" not in result
    n = len(members)
    eps = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    for name, tensor in result.items():
        assert same_bits(tensor, torch_mean(states, name, TORCH_DTYPES[dtype])), name
        exact = sum(state[name].double() for state in states) / n
        largest = max(state[name].double().abs().max() for state in states)
        # rounding to the output dtype, plus float32 accumulation, plus float16's subnormal spacing
        bound = eps * exact.abs() + n * 2.0**-24 * largest + 2.0**-25
        assert ((tensor.double() - exact).abs() <= bound).all(), name


@pytest.mark.parametrize("tie", [False, True])
def test_sharded_output_loads_with_transformers_and_gives_the_reference_logits(tmp_path, tie):
    members = [save_llama(tmp_path / f"ckpt-{seed}", seed, "bfloat16", tie=tie, shard_size="4KB")
               for seed in range(4)]
    summary = average_checkpoints(members, tmp_path / "avg", dtype=None, max_shard_size=3000, steps=None)

    out = tmp_path / "avg"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == len(summary["files"]) > 2
    assert [shard.name for shard in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                for i in range(1, len(shards) + 1)]
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}
    assert index["metadata"]["total_size"] == summary["bytes"] == sum(
        tensor.numel() * tensor.element_size() for tensor in load_weights(out).values())
    assert all(sum(entry.end - entry.begin for entry in read_header(shard).tensors.values()) <= 3000
               for shard in shards)

    states = [load_weights(member) for member in members]
    # the newest member loaded the same way, its weights replaced by the reference mean
    reference = AutoModelForCausalLM.from_pretrained(members[-1])
    missing, unexpected = reference.load_state_dict(
        {name: torch_mean(states, name, torch.bfloat16) for name in states[0]}, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if tie else [])  # tied to the embedding
    averaged = AutoModelForCausalLM.from_pretrained(out)
    assert averaged.dtype == torch.bfloat16
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(averaged(ids).logits, reference(ids).logits)


def test_requested_dtype_rounds_the_float32_mean_and_is_recorded_in_config(tmp_path):
    members = [save_llama(tmp_path / f"ckpt-{seed}", seed, "float32") for seed in range(3)]
    states = [load_weights(member) for member in members]
    for dtype in ["bfloat16", "float16", "float32"]:
        out = tmp_path / f"avg-{dtype}"
        average_checkpoints(members, out, dtype=dtype, max_shard_size=10**9, steps=None)
        result = load_weights(out)
        for name, tensor in result.items():
            assert same_bits(tensor, torch_mean(states, name, TORCH_DTYPES[dtype])), (dtype, name)
        assert json.loads((out / "config.json").read_text())["dtype"] == dtype
        assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == TORCH_DTYPES[dtype]


def test_bfloat16_members_averaged_into_float32_are_not_rounded(tmp_path):
    members = [save_llama(tmp_path / f"ckpt-{seed}", seed, "bfloat16") for seed in range(2)]
    average_checkpoints(members, tmp_path / "avg", dtype="float32", max_shard_size=10**9, steps=None)
    states = [load_weights(member) for member in members]
    for name, tensor in load_weights(tmp_path / "avg").items():
        # two bfloat16 values: their float32 sum and half are exact
        assert torch.equal(tensor, (states[0][name].float() + states[1][name].float()) / 2), name


def test_float64_tensors_accumulate_in_float64(tmp_path):
    generator = torch.Generator().manual_seed(1)
    members = [save_tensors(tmp_path / f"ckpt-{k}", {
        "w": torch.randn(5, 9, generator=generator, dtype=torch.float64),
        "v": torch.randn(11, generator=generator, dtype=torch.float32),
    }) for k in range(3)]
    states = [load_weights(member) for member in members]
    average_checkpoints(members, tmp_path / "keep", dtype=None, max_shard_size=10**9, steps=None)
    kept = load_weights(tmp_path / "keep")
    assert kept["w"].dtype == torch.float64
    assert same_bits(kept["w"], (states[0]["w"] + states[1]["w"] + states[2]["w"]) / 3)
    assert same_bits(kept["v"], torch_mean(states, "v", torch.float32))
    average_checkpoints(members, tmp_path / "bf16", dtype="bfloat16", max_shard_size=10**9, steps=None)
    narrowed = load_weights(tmp_path / "bf16")
    for name in ["w", "v"]:
        assert same_bits(narrowed[name], torch_mean(states, name, torch.bfloat16)), name


def test_integer_tensors_are_copied_from_the_newest_member(tmp_path):
    counter = torch.tensor([1234567890123], dtype=torch.int64)
    mask = torch.tensor([[True, False], [False, True]])
    members = [save_tensors(tmp_path / f"ckpt-{k}", {
        "weight": torch.full((3,), float(k), dtype=torch.bfloat16), "step": counter, "mask": mask,
    }) for k in range(3)]
    average_checkpoints(members, tmp_path / "avg", dtype="float32", max_shard_size=10**9, steps=None)
    result = load_weights(tmp_path / "avg")
    assert torch.equal(result["step"], counter) and torch.equal(result["mask"], mask)
    assert torch.equal(result["weight"], torch.full((3,), 1.0))


def test_disagreeing_integer_tensors_are_refused(tmp_path):
    members = [save_tensors(tmp_path / f"ckpt-{k}", {
        "weight": torch.zeros(4), "position_ids": torch.tensor([[0, 1, 2, 3 + (k == 1)]]),
    }) for k in range(3)]
    with pytest.raises(InputError) as caught:
        average_checkpoints(members, tmp_path / "avg", dtype=None, max_shard_size=10**9, steps=None)
    message = str(caught.value)
    assert str(members[1] / "model.safetensors") in message and "'position_ids'" in message
    assert "[0, 3]" in message and str(members[2] / "model.safetensors") in message
    assert not (tmp_path / "avg").exists()


def test_support_files_from_the_newest_member_and_provenance(tmp_path):
    members = [save_llama(tmp_path / f"ckpt-{seed}", seed) for seed in range(3)]
    for member in members:
        (member / "tokenizer.json").write_text(f'{{"from": "{member.name}"}}')
        (member / "optimizer.pt").write_bytes(b"optimizer state")
        (member / "trainer_state.json").write_text(member.name)
    (members[-1] / "subdir").mkdir()
    average_checkpoints(members, tmp_path / "avg", dtype=None, max_shard_size=10**9, steps=[100, 200, 300])

    out = tmp_path / "avg"
    assert sorted(path.name for path in out.iterdir()) == [
        "averaging.json", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "trainer_state.json"]
    for name in ["config.json", "generation_config.json", "tokenizer.json", "trainer_state.json"]:
        assert (out / name).read_bytes() == (members[-1] / name).read_bytes(), name
    provenance = json.loads((out / "averaging.json").read_text())
    assert provenance["members"] == [{"path": str(member.resolve()), "step": step, "coefficient": 1 / 3}
                                     for member, step in zip(members, [100, 200, 300])]
    assert provenance["scheme"] == {"scheme": "uniform"} and provenance["effective_step"] == 200
    assert provenance["version"] == ckpt_stability.__version__
    assert provenance["dtype"] is None and provenance["definition"] == averaging.UNIFORM_DEFINITION


def test_the_safetensors_layout_is_aligned_sorted_and_padded(tmp_path):
    members = [save_tensors(tmp_path / f"ckpt-{k}", {
        "b.odd": torch.ones(3, dtype=torch.bfloat16), "a.wide": torch.ones(5, dtype=torch.float32),
        "c.count": torch.tensor([7], dtype=torch.int64),
    }) for k in range(2)]
    average_checkpoints(members, tmp_path / "avg", dtype=None, max_shard_size=10**9, steps=None)
    data = (tmp_path / "avg" / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    assert length % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
    assert list(header) == ["c.count", "a.wide", "b.odd"]  # element size descending, then name
    assert [entry["data_offsets"] for entry in header.values()] == [[0, 8], [8, 28], [28, 34]]
    assert len(data) == 8 + length + 34


# --- refusals: each message names the checkpoint (file) and the tensor -------------------------------

def refusal(members, output, keep_output=False, **options) -> str:
    """The message of the InputError that averaging ``members`` raises; no output is left behind."""
    with pytest.raises(InputError) as caught:
        average_checkpoints(members, output, **{"dtype": None, "max_shard_size": 10**9, "steps": None,
                                                **options})
    assert keep_output or not output.exists()
    return str(caught.value)


@pytest.fixture
def pair(tmp_path):
    return [save_llama(tmp_path / f"ckpt-{seed}", seed, shard_size="4KB") for seed in range(2)]


def test_refuses_fewer_than_two_members(tmp_path, pair):
    message = refusal(pair[:1], tmp_path / "avg")
    assert "at least 2" in message and str(pair[0]) in message


def test_refuses_a_member_given_twice(tmp_path, pair):
    message = refusal([pair[0], pair[1], pair[0]], tmp_path / "avg")
    assert "twice" in message and str(pair[0]) in message


def test_refuses_steps_that_do_not_match_the_members(tmp_path, pair):
    assert "3 steps" in refusal(pair, tmp_path / "avg", steps=[1, 2, 3])


def tensor_sets(base: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [{"a": base.clone(), "b": base.clone()}, {"a": base.clone(), "b": base.clone()}]


@pytest.mark.parametrize(("change", "expected"), [
    (lambda t: t.pop("b"), ["'b' is missing"]),
    (lambda t: t.update(c=torch.zeros(2)), ["'c'", "lacks"]),
    (lambda t: t.update(b=torch.zeros(3, 3)), ["'b'", "shape [3, 3]", "[2, 3]"]),
    (lambda t: t.update(b=torch.zeros(2, 3, dtype=torch.float16)), ["'b'", "F16", "F32"]),
])
def test_refuses_tensors_that_differ_in_name_shape_or_dtype(tmp_path, change, expected):
    older, newest = tensor_sets(torch.zeros(2, 3))
    change(older)
    members = [save_tensors(tmp_path / "old", older), save_tensors(tmp_path / "new", newest)]
    message = refusal(members, tmp_path / "avg")
    assert str(members[0]) in message and all(part in message for part in expected), message


def test_refuses_a_dtype_that_cannot_be_averaged(tmp_path):
    members = [save_tensors(tmp_path / f"ckpt-{k}", {"q": torch.zeros(4, dtype=torch.float8_e4m3fn)})
               for k in range(2)]
    message = refusal(members, tmp_path / "avg")
    assert str(members[1] / "model.safetensors") in message and "'q'" in message and "F8_E4M3" in message


def test_refuses_a_missing_shard(tmp_path, pair):
    shard = sorted(pair[0].glob("model-*.safetensors"))[1]
    shard.unlink()
    message = refusal(pair, tmp_path / "avg")
    assert str(pair[0]) in message and shard.name in message and "missing" in message


def test_refuses_a_truncated_shard(tmp_path, pair):
    shard = sorted(pair[1].glob("model-*.safetensors"))[0]
    os.truncate(shard, shard.stat().st_size - 10)
    message = refusal(pair, tmp_path / "avg")
    assert str(pair[1]) in message and shard.name in message and "truncated" in message


def test_refuses_a_nan_in_a_member(tmp_path):
    values = [torch.ones(3, 4) for _ in range(3)]
    values[1][2, 1] = float("nan")
    members = [save_tensors(tmp_path / f"ckpt-{k}", {"ok": torch.ones(2), "w": value})
               for k, value in enumerate(values)]
    message = refusal(members, tmp_path / "avg")
    assert str(members[1] / "model.safetensors") in message and "'w'" in message
    assert "nan" in message and "[2, 1]" in message


@pytest.mark.parametrize(("stored", "value", "dtype", "reason"), [
    (torch.float32, 3e38, None, "inf"),            # the float32 sum overflows
    (torch.float64, 3.5e38, "float32", "F32"),     # the float64 mean does not fit in float32
    (torch.float64, 3.39e38, "bfloat16", None),    # rounds down to the largest bfloat16
    (torch.float64, 3.397e38, "bfloat16", "BF16"),  # rounds up to infinity
    (torch.float32, 65519.0, "float16", None),     # rounds down to 65504
    (torch.float32, 65520.0, "float16", "F16"),    # rounds up to infinity
])
def test_refuses_a_mean_beyond_the_output_range(tmp_path, stored, value, dtype, reason):
    members = [save_tensors(tmp_path / f"ckpt-{k}", {"w": torch.tensor([1.0, value, -1.0], dtype=stored)})
               for k in range(2)]
    if reason is None:
        average_checkpoints(members, tmp_path / "avg", dtype=dtype, max_shard_size=10**9, steps=None)
        assert torch.isfinite(load_weights(tmp_path / "avg")["w"]).all()
        return
    message = refusal(members, tmp_path / "avg", dtype=dtype)
    assert "'w'" in message and "[1]" in message and reason in message
    assert all(str(member / "model.safetensors") in message for member in members)


def test_output_holding_another_model_is_refused_and_the_same_average_replaced(tmp_path, pair):
    third = save_llama(tmp_path / "ckpt-2", 2)
    out = tmp_path / "avg"
    out.write_text("a file")
    assert "not a directory" in refusal(pair, out, keep_output=True)
    out.unlink()
    out.mkdir()  # an empty directory (e.g. made by a workflow manager) is fine
    average_checkpoints(pair, out, dtype=None, max_shard_size=10**9, steps=None)
    first = load_weights(out)
    # the same members again (another dtype): recomputed and replaced
    average_checkpoints(pair, out, dtype="float32", max_shard_size=10**9, steps=None)
    assert all(tensor.dtype == torch.float32 for tensor in load_weights(out).values())
    message = refusal([pair[1], third], out, keep_output=True)
    assert str(out) in message and "other checkpoints" in message
    message = refusal(pair, pair[0], keep_output=True)  # a checkpoint, not an average
    assert str(pair[0]) in message and "averaging.json" in message
    assert first.keys() == load_weights(out).keys()


# --- the command line -------------------------------------------------------------------------------

def test_cli_averages_and_reports_bad_input_with_exit_code_2(tmp_path, pair, capsys):
    out = tmp_path / "avg"
    assert main(["average", "--output", str(out), "--steps", "10,20", "--max-shard-size", "3KB",
                 "--dtype", "float32", *map(str, pair)]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    provenance = json.loads((out / "averaging.json").read_text())
    assert [member["step"] for member in provenance["members"]] == [10, 20]
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32

    capsys.readouterr()
    (pair[1] / "model.safetensors.index.json").write_text("{}")
    assert main(["average", "--output", str(tmp_path / "bad"), *map(str, pair)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ckpt-stability average: error: ") and str(pair[1]) in error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1


# --- large (sparse) checkpoints: bounded memory, and a killed job ------------------------------------

LARGE_TENSORS = {"big.a": (2**25,), "big.b": (2**12, 2**13), "small": (1000,)}
"""two 128 MiB float32 tensors per member: a tensor-at-a-time averager would need over 384 MiB"""


def sparse_checkpoint(path: Path) -> Path:
    """A float32 checkpoint of zeros written as a sparse file: large, yet instant to create."""
    header, begin = {}, 0
    for name, shape in LARGE_TENSORS.items():
        size = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + size]}
        begin += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.mkdir(parents=True)
    with open(path / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        handle.truncate(8 + len(text) + begin)
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def large_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    return [sparse_checkpoint(root / f"ckpt-{k}") for k in range(2)]


def cli_command(members: list[Path], output: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "ckpt-stability"), "average", "--output", str(output),
            *map(str, members)]


@pytest.mark.parametrize("options", [[], ["--scheme", "ema", "--half-life", "1", "--steps", "1", "2", "--diagnostics",
                                          "distances.json"]], ids=["uniform", "weighted, with the weight distances"])
def test_peak_memory_is_a_few_chunks_not_the_model(large_pair, tmp_path, options):
    # VmHWM is the peak RSS of this process image only (not of the pytest process that forked it)
    script = ("import sys; from ckpt_stability.cli import main; code = main(sys.argv[1:]); "
              "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]); "
              "sys.exit(code)")
    out = tmp_path / "avg"
    done = subprocess.run([sys.executable, "-c", script, *cli_command(large_pair, out)[1:], *options],
                          capture_output=True, text=True, check=True, cwd=tmp_path)
    peak_mib = int(done.stdout.split()[-1]) / 1024
    assert peak_mib < 150, done.stdout
    written, member = (read_header(path / "model.safetensors").tensors for path in (out, large_pair[0]))
    assert {name: entry.shape for name, entry in written.items()} == LARGE_TENSORS
    assert ([entry.end - entry.begin for entry in written.values()]
            == [entry.end - entry.begin for entry in member.values()])
    shutil.rmtree(out)  # not sparse: do not leave it in pytest's kept temporary directories


def test_a_killed_job_leaves_no_complete_looking_output(large_pair, tmp_path):
    out = tmp_path / "avg"
    job = subprocess.Popen(cli_command(large_pair, out), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    # kill it once it is writing the weights into its temporary directory
    while not any(path.stat().st_size > 0 for path in tmp_path.glob(".avg.*/model.safetensors")):
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    job.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL
    assert not out.exists()
    assert all(path.name.startswith(".avg.") for path in tmp_path.iterdir())
    # the leftover temporary directory does not stand in the way of a rerun
    subprocess.run(cli_command(large_pair, out), check=True, stderr=subprocess.DEVNULL)
    assert (out / "averaging.json").is_file()
    for path in tmp_path.iterdir():
        shutil.rmtree(path)
