"""Checkpoints saved as pytorch_model.bin (single or sharded): discovery, completeness, unsupported formats,
averaging (bit-identical to safetensors members) and evaluation, for each of the four weight layouts."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_stability import averaging
from ckpt_stability.averaging import average_checkpoints
from ckpt_stability.checkpoints import (LAYOUTS, SUPPORTED, check_model_dir, discover, plan_run,
                                        read_checkpoint_headers, weight_files)
from ckpt_stability.errors import InputError, UnusableCheckpoint
from ckpt_stability.predictions import read_predictions
from helpers import JGLUE, cli

SHARDED = [layout for layout in LAYOUTS if layout.endswith(".index.json")]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")


def write_layout(state: dict[str, torch.Tensor], directory: Path, layout: str, *, support: Path | None = None,
                 shards: int = 3) -> Path:
    """``state`` saved in ``layout`` (one of LAYOUTS; the index layouts in ``shards`` files) with the
    non-weight files of ``support`` (else a minimal config.json)."""
    directory.mkdir(parents=True)
    if support is None:
        (directory / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
    else:
        for path in support.iterdir():
            if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy(path, directory / path.name)
    safetensors = layout.startswith("model.safetensors")
    save = (lambda part, path: save_file(part, path, metadata={"format": "pt"})) if safetensors else torch.save
    if not layout.endswith(".index.json"):
        save(state, directory / layout)
        return directory
    names = sorted(state)
    weight_map, total = {}, 0
    for number in range(shards):
        part = {name: state[name] for name in names[number::shards]}
        file = (f"model-{number + 1:05d}-of-{shards:05d}.safetensors" if safetensors
                else f"pytorch_model-{number + 1:05d}-of-{shards:05d}.bin")
        save(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
        total += sum(tensor.numel() * tensor.element_size() for tensor in part.values())
    (directory / layout).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return directory


def random_state(seed: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A small model's weights: several shapes, a second copy of the embedding (as a tied head), an integer
    and a bool buffer equal in every member."""
    generator = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in
             {"embed.weight": (40, 12), "layers.0.w": (12, 30), "layers.0.norm": (12,), "layers.1.w": (30, 12)}.items()}
    state["lm_head.weight"] = state["embed.weight"].clone()
    state["position_ids"] = torch.arange(9).unsqueeze(0)
    state["mask"] = torch.tensor([[True, False, True]])
    return state


def as_views(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same values stored the ways torch.save keeps views: transposed (non-contiguous) storage, an
    offset into a larger storage, every other element, and the tied head sharing the embedding's storage."""
    views = dict(state)
    for name in ("layers.0.w", "layers.1.w"):
        views[name] = state[name].t().contiguous().t()
    views["layers.0.norm"] = torch.cat([torch.zeros(5, dtype=state["layers.0.norm"].dtype),
                                        state["layers.0.norm"]])[5:]
    views["embed.weight"] = torch.stack([state["embed.weight"], torch.zeros_like(state["embed.weight"])], -1)[..., 0]
    views["lm_head.weight"] = views["embed.weight"]
    return views


def checkpoint_run(root: Path, layout: str, steps=(1, 2, 3)) -> list[Path]:
    return [write_layout(random_state(step), root / f"checkpoint-{step}", layout) for step in steps]


# ---------------------------------------------------------------- discovery and completeness


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_is_discovered_complete_with_the_same_tensors(tmp_path, layout):
    members = checkpoint_run(tmp_path, layout)
    found = discover(str(tmp_path / "checkpoint-{step}"))
    assert found.complete == {1: members[0], 2: members[1], 3: members[2]}
    assert found.incomplete == {} and found.unsupported == {}
    table = {name: (entry.dtype, entry.shape) for name, (_, entry) in read_checkpoint_headers(members[0]).items()}
    assert table == {name: ({torch.bfloat16: "BF16", torch.int64: "I64", torch.bool: "BOOL"}[tensor.dtype],
                            tuple(tensor.shape)) for name, tensor in random_state(1).items()}
    assert [path.name for path in weight_files(members[0])] == (
        [layout] if not layout.endswith(".index.json")
        else sorted(set(json.loads((members[0] / layout).read_text())["weight_map"].values())))


def last_weight_file(directory: Path, layout: str) -> Path:
    if layout.endswith(".index.json"):
        return directory / sorted(set(json.loads((directory / layout).read_text())["weight_map"].values()))[-1]
    return directory / layout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_weight_file_being_copied_is_incomplete_until_whole(tmp_path, layout):
    source = write_layout(random_state(0), tmp_path / "source", layout)
    copying = tmp_path / "run" / "checkpoint-1"
    shutil.copytree(source, copying)
    weights = last_weight_file(copying, layout)
    data = (last_weight_file(source, layout)).read_bytes()
    for size in (100, len(data) // 2, len(data) - 10):
        weights.write_bytes(data[:size])
        found = discover(str(tmp_path / "run" / "checkpoint-{step}"))
        assert found.complete == {} and found.unsupported == {}, size
        reason = found.incomplete[copying]
        named = weights.name + (f" (named by {layout})" if layout.endswith(".index.json") else "")
        assert reason.startswith(f"{named} is unreadable: truncated"), reason
        with pytest.raises(UnusableCheckpoint, match=re.escape(f"not a complete checkpoint: {named} is unreadable")):
            read_checkpoint_headers(copying)
    weights.write_bytes(data)
    assert discover(str(tmp_path / "run" / "checkpoint-{step}")).complete == {1: copying}


def test_a_zip_record_reaching_past_the_central_directory_is_incomplete(tmp_path):
    """A .bin file whose end is written but not every record (a copier writing out of order)."""
    checkpoint = write_layout(random_state(0), tmp_path / "checkpoint-1", "pytorch_model.bin")
    path = checkpoint / "pytorch_model.bin"
    with zipfile.ZipFile(path) as archive:
        record = [info for info in archive.infolist() if "/data/" in info.filename][-1]
        central_directory = archive.start_dir
    data = bytearray(path.read_bytes())
    entry = data.rfind(record.filename.encode()) - 46  # its central directory entry
    assert data[entry:entry + 4] == b"PK\x01\x02"
    struct.pack_into("<I", data, entry + 42, central_directory - 40)  # its local header's offset
    path.write_bytes(data)
    reason = discover(str(tmp_path / "checkpoint-{step}")).incomplete[checkpoint]
    assert reason.startswith("pytorch_model.bin is unreadable: truncated zip archive") and record.filename in reason


@pytest.mark.parametrize("layout", SHARDED)
def test_a_shard_missing_from_the_index_is_incomplete(tmp_path, layout):
    checkpoint = write_layout(random_state(0), tmp_path / "checkpoint-1", layout)
    shard = last_weight_file(checkpoint, layout)
    shard.unlink()
    found = discover(str(tmp_path / "checkpoint-{step}"))
    assert found.complete == {} and found.unsupported == {}
    assert found.incomplete == {checkpoint: f"{shard.name} (named by {layout}) is missing"}
    # shards there, but not the index yet
    write_layout(random_state(0), tmp_path / "shards", layout)
    (tmp_path / "shards" / layout).unlink()
    shutil.copytree(tmp_path / "shards", tmp_path / "checkpoint-2")
    assert discover(str(tmp_path / "checkpoint-{step}")).incomplete[tmp_path / "checkpoint-2"].endswith(
        f"is present but not {layout}")


def test_safetensors_are_preferred_to_bin_as_transformers_does(tmp_path):
    checkpoint = write_layout(random_state(0), tmp_path / "checkpoint-1", "pytorch_model.bin")
    save_file(random_state(0), checkpoint / "model.safetensors")
    assert [path.name for path in weight_files(checkpoint)] == ["model.safetensors"]
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[:-10])  # the safetensors copy is still under way
    assert "model.safetensors is unreadable: truncated" in discover(str(tmp_path / "checkpoint-{step}")).incomplete[
        checkpoint]
    (checkpoint / "model.safetensors").unlink()
    assert [path.name for path in weight_files(checkpoint)] == ["pytorch_model.bin"]


def test_discovery_and_bin_averaging_do_not_import_torch(tmp_path):
    """The workflow discovers checkpoints while parsing the DAG, and every averaging job is a fresh process."""
    for layout in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
        checkpoint_run(tmp_path / layout, layout)
    script = f"""
import sys
from pathlib import Path
from ckpt_stability.averaging import average_checkpoints
from ckpt_stability.checkpoints import discover, read_checkpoint_headers
root = Path({str(tmp_path)!r})
for layout in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
    found = discover(str(root / layout / "checkpoint-{{step}}"))
    assert len(found.complete) == 3, found
    read_checkpoint_headers(found.complete[1])
    average_checkpoints(list(found.complete.values()), root / ("avg-" + layout), max_shard_size=10**9)
assert "torch" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", script], check=True)


# ---------------------------------------------------------------- unsupported formats


def unsupported_examples(root: Path) -> dict[str, str]:
    """Checkpoint directories of other formats -> what discovery must say it found."""
    examples = {
        "gguf": ({"model-q8_0.gguf": b"GGUF\x03\x00\x00\x00"}, "model-q8_0.gguf (GGUF)"),
        "tensorflow": ({"tf_model.h5": b"\x89HDF\r\n"}, "tf_model.h5 (TensorFlow/Keras)"),
        "flax": ({"flax_model.msgpack": b"\x80"}, "flax_model.msgpack (Flax)"),
        "meta": ({"consolidated.00.pth": b"PK", "params.json": b"{}"},
                 "consolidated.00.pth (Meta's consolidated checkpoint format)"),
        "megatron": ({"mp_rank_00_model_states.pt": b"PK"},
                     "mp_rank_00_model_states.pt (a DeepSpeed or Megatron model-parallel checkpoint)"),
        "deepspeed": ({"global_step100/mp_rank_00_model_states.pt": b"PK", "latest": b"global_step100"},
                      "global_step100/ (a DeepSpeed checkpoint"),
        "pt": ({"model.pt": b"PK"}, "model.pt;"),
        "legacy": ({}, "found pytorch_model.bin: a plain pickle (torch's legacy serialization of torch < 1.6"),
        "module": ({}, "found pytorch_model.bin: holding a pickled torch.nn.modules.linear.Linear"),
        "sharded-legacy": ({}, "found pytorch_model-00002-of-00003.bin (named by pytorch_model.bin.index.json): "
                               "a plain pickle"),
    }
    for name, (files, _) in examples.items():
        directory = root / f"{name}-1"
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")
        for file, data in files.items():
            (directory / file).parent.mkdir(exist_ok=True)
            (directory / file).write_bytes(data)
    torch.save(random_state(0), root / "legacy-1" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    torch.save(torch.nn.Linear(2, 2), root / "module-1" / "pytorch_model.bin")
    shutil.rmtree(root / "sharded-legacy-1")
    write_layout(random_state(0), root / "sharded-legacy-1", "pytorch_model.bin.index.json")
    torch.save({"embed.weight": random_state(0)["embed.weight"]},
               root / "sharded-legacy-1" / "pytorch_model-00002-of-00003.bin", _use_new_zipfile_serialization=False)
    return {name: found for name, (_, found) in examples.items()}


def test_weights_in_an_unsupported_format_are_named_never_called_incomplete(tmp_path):
    examples = unsupported_examples(tmp_path)
    training_state = tmp_path / "training-1"  # a trainer checkpoint whose weights are not copied yet
    training_state.mkdir()
    (training_state / "config.json").write_text("{}")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json"):
        (training_state / name).write_bytes(b"PK")

    for name, expected in examples.items():
        found = discover(str(tmp_path / f"{name}-{{step}}"))
        assert found.complete == {} and found.incomplete == {}, name
        reason = found.unsupported[tmp_path / f"{name}-1"]
        assert reason.startswith("unsupported weight format: found "), reason
        assert expected in reason and reason.endswith(f"; supported: {SUPPORTED}"), reason
    assert SUPPORTED == ("model.safetensors, model.safetensors.index.json, pytorch_model.bin, "
                         "pytorch_model.bin.index.json")
    found = discover(str(tmp_path / "training-{step}"))
    assert found.unsupported == {} and found.incomplete == {training_state: (
        "neither model.safetensors, model.safetensors.index.json, pytorch_model.bin nor pytorch_model.bin.index.json "
        "is present")}

    # plan_run hands them on for the workflow's warning, and names them when the run is too short
    run = plan_run("r", str(tmp_path / "legacy-{step}"), largest_window=1, produced_steps=[2, 3, 4])
    assert list(run.unsupported) == [tmp_path / "legacy-1"] and run.incomplete == {}
    with pytest.raises(InputError, match=r"in an unsupported weight format: .*legacy-1 \(supported: model"):
        plan_run("r", str(tmp_path / "legacy-{step}"), largest_window=1)

    # the commands say the same, as an UnusableCheckpoint
    for name in ("legacy", "gguf"):
        with pytest.raises(UnusableCheckpoint, match="unsupported weight format: found"):
            check_model_dir(tmp_path / f"{name}-1")
    result = cli("evaluate", "--model", tmp_path / "module-1", "--task", JGLUE / "jnli.json", "--backend",
                 "transformers", "--output-dir", tmp_path / "out")
    assert result.returncode != 0 and examples["module"] in result.stderr and "Traceback" not in result.stderr
    result = cli("average", "--output", tmp_path / "avg", tmp_path / "legacy-1", tmp_path / "sharded-legacy-1")
    assert result.returncode != 0 and examples["legacy"] in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- averaging


@pytest.fixture(params=["default", "tiny"])
def chunk_elements(request, monkeypatch):
    """Both the real chunk size and 7-element chunks, so that tensors span many chunks."""
    if request.param == "tiny":
        monkeypatch.setattr(averaging, "CHUNK_ELEMENTS", 7)


MIXES = {
    "bin": ["pytorch_model.bin"] * 3,
    "bin-sharded": ["pytorch_model.bin.index.json"] * 3,
    "mixed": ["pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json"],
    "bin-views": ["views"] * 3,
    "views-and-safetensors": ["model.safetensors", "views", "pytorch_model.bin.index.json"],
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mix", MIXES)
def test_averaging_bin_members_is_bit_identical_to_safetensors_members(tmp_path, chunk_elements, mix, dtype):
    states = [random_state(seed, dtype) for seed in range(3)]
    reference = [write_layout(state, tmp_path / f"st-{k}", "model.safetensors") for k, state in enumerate(states)]
    members = [write_layout(as_views(state), tmp_path / f"{mix}-{k}", "pytorch_model.bin") if layout == "views"
               else write_layout(state, tmp_path / f"{mix}-{k}", layout)
               for k, (state, layout) in enumerate(zip(states, MIXES[mix]))]
    if "views" in MIXES[mix]:
        strided = read_checkpoint_headers(members[MIXES[mix].index("views")])
        assert strided["layers.0.w"][1].strides == (1, 12) and strided["embed.weight"][1].strides == (24, 2)
        assert strided["lm_head.weight"][1] == replace(strided["embed.weight"][1], name="lm_head.weight")
    average_checkpoints(reference, tmp_path / "reference", max_shard_size=10**9)
    average_checkpoints(members, tmp_path / "avg", max_shard_size=10**9)
    expected = (tmp_path / "reference" / "model.safetensors").read_bytes()
    assert (tmp_path / "avg" / "model.safetensors").read_bytes() == expected
    assert sorted(path.name for path in (tmp_path / "avg").iterdir()) == ["averaging.json", "config.json",
                                                                          "model.safetensors"]
    # and it is the definition: torch's float32 mean, rounded to the members' dtype
    result = load_file(tmp_path / "avg" / "model.safetensors")
    for name, tensor in result.items():
        if tensor.is_floating_point():
            mean = ((states[0][name].float() + states[1][name].float() + states[2][name].float()) / 3).to(dtype)
            assert torch.equal(tensor.view(torch.uint8), mean.view(torch.uint8)), name
        else:
            assert torch.equal(tensor, states[-1][name]), name


@pytest.mark.parametrize("newest", ["pytorch_model.bin", "model.safetensors"])
def test_tied_weights_saved_twice_in_bin_average_with_safetensors_that_keep_one(tmp_path, newest):
    """transformers 4 saved a tied head in pytorch_model.bin as a second name of the embedding's storage; its
    safetensors files, and transformers 5's, keep the embedding alone. Both in one window still average."""
    states = [random_state(seed) for seed in range(3)]
    members = []
    for k, layout in enumerate(["pytorch_model.bin", "model.safetensors", newest]):
        state = dict(states[k])
        if layout == "pytorch_model.bin":
            state["lm_head.weight"] = state["embed.weight"]
        else:
            del state["lm_head.weight"]
        members.append(write_layout(state, tmp_path / f"ckpt-{k}", layout))
    average_checkpoints(members, tmp_path / "avg", max_shard_size=10**9)
    result = load_file(tmp_path / "avg" / "model.safetensors")
    assert sorted(result) == sorted(name for name in states[0] if name != "lm_head.weight" or newest.endswith(".bin"))
    for name, tensor in result.items():
        source = "embed.weight" if name == "lm_head.weight" else name
        if tensor.is_floating_point():
            mean = ((states[0][source].float() + states[1][source].float() + states[2][source].float()) / 3)
            assert torch.equal(tensor.view(torch.uint8), mean.to(torch.bfloat16).view(torch.uint8)), name
    # a name missing for another reason is still refused
    del states[0]["layers.1.w"]
    write_layout(states[0], tmp_path / "other", "model.safetensors")
    with pytest.raises(UnusableCheckpoint, match="tensor 'layers.1.w' is missing"):
        average_checkpoints([tmp_path / "other", members[2]], tmp_path / "avg2", max_shard_size=10**9)


@pytest.mark.parametrize("views", [False, True])
def test_a_nan_in_a_bin_member_is_refused_naming_the_file_and_the_tensor(tmp_path, views):
    values = [torch.ones(3, 4) for _ in range(3)]
    values[1][2, 1] = float("nan")
    members = [write_layout({"ok": torch.ones(2), "w": value.t().contiguous().t() if views else value},
                            tmp_path / f"ckpt-{k}", "pytorch_model.bin") for k, value in enumerate(values)]
    with pytest.raises(UnusableCheckpoint) as caught:
        average_checkpoints(members, tmp_path / "avg", max_shard_size=10**9)
    message = str(caught.value)
    assert message.startswith(f"{members[1] / 'pytorch_model.bin'}: tensor 'w' holds nan at [2, 1]"), message
    assert not (tmp_path / "avg").exists()


def test_bin_members_that_disagree_are_unusable_checkpoints(tmp_path):
    first = write_layout({"w": torch.ones(3, 4)}, tmp_path / "a", "pytorch_model.bin")
    second = write_layout({"w": torch.ones(4, 3)}, tmp_path / "b", "pytorch_model.bin.index.json", shards=1)
    with pytest.raises(UnusableCheckpoint, match=r"pytorch_model.bin: tensor 'w' has shape \[3, 4\], but \[4, 3\] in "
                                                 r".*pytorch_model-00001-of-00001.bin"):
        average_checkpoints([first, second], tmp_path / "avg", max_shard_size=10**9)
    index = json.loads((second / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["v"] = "pytorch_model-00001-of-00001.bin"
    (second / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(UnusableCheckpoint, match="names tensor 'v' in pytorch_model-00001-of-00001.bin, which does "
                                                 "not hold it"):
        read_checkpoint_headers(second)
    with pytest.raises(InputError) as caught:  # an argument error stays an InputError
        average_checkpoints([first], tmp_path / "avg", max_shard_size=10**9)
    assert not isinstance(caught.value, UnusableCheckpoint)


LARGE = {"big.a": (2**24,), "big.b": (2**12, 2**12), "small": (1000,)}
"""two 64 MiB float32 tensors per member: a tensor-at-a-time averager would need 192 MiB"""


def test_peak_memory_with_bin_members_is_a_few_chunks_not_the_model(tmp_path):
    members = []
    for k in range(2):
        state = {name: torch.full(shape, float(k)) for name, shape in LARGE.items()}
        members.append(write_layout(state, tmp_path / f"ckpt-{k}", "pytorch_model.bin"))
        del state
    script = ("import sys; from ckpt_stability.cli import main; code = main(sys.argv[1:]); "
              "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]); "
              "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, "average", "--output", str(tmp_path / "avg"),
                           *map(str, members)], capture_output=True, text=True, check=True)
    peak_mib = int(done.stdout.split()[-1]) / 1024
    assert peak_mib < 150, done.stdout
    result = load_file(tmp_path / "avg" / "model.safetensors")
    assert all(torch.equal(result[name], torch.full(shape, 0.5)) for name, shape in LARGE.items())
    for path in tmp_path.iterdir():  # 400 MB: do not leave them in pytest's kept temporary directories
        shutil.rmtree(path)


# ---------------------------------------------------------------- evaluation


def evaluate(model: Path, out: Path) -> subprocess.CompletedProcess:
    return cli("evaluate", "--model", model, "--task", JGLUE / "jnli.json", "--task", JGLUE / "jsquad.json",
               "--num-fewshot", "1", "--max-samples", "3", "--backend", "transformers", "--output-dir", out)


def test_evaluating_a_bin_checkpoint_predicts_as_the_safetensors_one(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    state = load_file(tiny_model_dir / "model.safetensors")
    models = {"model.safetensors": tiny_model_dir}
    # pytorch_model.bin as transformers 4 wrote it: the tied head saved too, sharing the embedding's storage
    tied = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert tied["lm_head.weight"].data_ptr() == tied["model.embed_tokens.weight"].data_ptr()
    models["pytorch_model.bin"] = write_layout(tied, tmp_path / "bin", "pytorch_model.bin", support=tiny_model_dir)
    models["pytorch_model.bin.index.json"] = write_layout(state, tmp_path / "bin-sharded",
                                                          "pytorch_model.bin.index.json", support=tiny_model_dir)
    check_model_dir(write_layout(state, tmp_path / "sharded", "model.safetensors.index.json", support=tiny_model_dir))
    reference = None
    for name, model in models.items():
        check_model_dir(model)  # with torch.load(weights_only=True, mmap=True) for the .bin files
        result = evaluate(model, tmp_path / "out" / name)
        assert result.returncode == 0, result.stderr
        predictions = [read_predictions(tmp_path / "out" / name / f"{task}.parquet") for task in ("jnli", "jsquad")]
        if reference is None:
            reference = predictions
            continue
        for got, expected in zip(predictions, reference):
            assert got.prediction == expected.prediction, name
            assert np.array_equal(got.score, expected.score), name
            if expected.choice_logprobs is not None:
                assert np.array_equal(got.choice_logprobs, expected.choice_logprobs), name
