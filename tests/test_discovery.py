"""Checkpoint discovery: numeric order, several runs, incomplete checkpoints, gaps, windows."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from ckpt_stability.checkpoints import discover, plan_run
from ckpt_stability.errors import InputError


def make_checkpoint(directory, sharded=False):
    """A minimal complete checkpoint: config.json and valid safetensors weights."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    tensors = {"a": np.ones((4, 4), np.float32), "b": np.zeros(3, np.float32)}
    if sharded:
        save_file({"a": tensors["a"]}, directory / "model-00001-of-00002.safetensors")
        save_file({"b": tensors["b"]}, directory / "model-00002-of-00002.safetensors")
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(tensors, directory / "model.safetensors")
    return directory


def test_steps_are_integers_in_numeric_order(tmp_path):
    for step in (1000, 20, 300, 5):
        make_checkpoint(tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-final").mkdir()  # not an integer step: ignored
    (tmp_path / "checkpoint-40.bak").mkdir()  # does not match the pattern: ignored
    found = discover(str(tmp_path / "checkpoint-{step}"))
    assert list(found.complete) == [5, 20, 300, 1000]
    assert found.complete[300] == tmp_path / "checkpoint-300"
    assert found.incomplete == {}


def test_step_placeholder_inside_the_path_and_zero_padding(tmp_path):
    make_checkpoint(tmp_path / "iter_0000200" / "hf")
    make_checkpoint(tmp_path / "iter_0000100" / "hf", sharded=True)
    found = discover(str(tmp_path / "iter_{step}" / "hf"))
    assert list(found.complete) == [100, 200]
    assert found.complete[200] == tmp_path / "iter_0000200" / "hf"


def test_several_runs_side_by_side(tmp_path):
    for step in (10, 20):
        make_checkpoint(tmp_path / "run_a" / f"step{step}")
    for step in (10, 30, 50):
        make_checkpoint(tmp_path / "run_b" / f"step{step}")
    assert list(discover(str(tmp_path / "run_a" / "step{step}")).complete) == [10, 20]
    assert list(discover(str(tmp_path / "run_b" / "step{step}")).complete) == [10, 30, 50]


def test_incomplete_checkpoints_are_left_out_with_the_reason(tmp_path):
    make_checkpoint(tmp_path / "ckpt-1")
    no_config = make_checkpoint(tmp_path / "ckpt-2")
    (no_config / "config.json").unlink()
    missing_shard = make_checkpoint(tmp_path / "ckpt-3", sharded=True)
    (missing_shard / "model-00002-of-00002.safetensors").unlink()
    empty = make_checkpoint(tmp_path / "ckpt-4")
    (empty / "model.safetensors").write_bytes(b"")
    copying = make_checkpoint(tmp_path / "ckpt-5")  # a copy in progress: the header announces more bytes
    data = (copying / "model.safetensors").read_bytes()
    (copying / "model.safetensors").write_bytes(data[: len(data) - 10])
    no_weights = tmp_path / "ckpt-6"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    half_index = make_checkpoint(tmp_path / "ckpt-7", sharded=True)
    (half_index / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-0')

    found = discover(str(tmp_path / "ckpt-{step}"))
    assert list(found.complete) == [1]
    reasons = {path.name: reason for path, reason in found.incomplete.items()}
    assert reasons["ckpt-2"] == "config.json is missing"
    assert reasons["ckpt-3"] == ("model-00002-of-00002.safetensors (named by model.safetensors.index.json) "
                                 "is missing")
    assert reasons["ckpt-4"] == "model.safetensors is empty"
    assert "truncated safetensors file" in reasons["ckpt-5"]
    assert reasons["ckpt-6"] == ("neither model.safetensors, model.safetensors.index.json, pytorch_model.bin nor "
                                 "pytorch_model.bin.index.json is present")
    assert "not a valid index" in reasons["ckpt-7"]


def test_truncated_header_is_incomplete(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt-1")
    (checkpoint / "model.safetensors").write_bytes(struct.pack("<Q", 500) + b"{")
    assert "truncated" in discover(str(tmp_path / "ckpt-{step}")).incomplete[checkpoint]


def test_windows_follow_checkpoint_order_across_gaps(tmp_path):
    for step in (100, 200, 400, 800, 900):
        make_checkpoint(tmp_path / f"c{step}")
    run = plan_run("r", str(tmp_path / "c{step}"), largest_window=2)
    assert run.steps == [100, 200, 400, 800, 900]
    assert run.window(800, 2) == [400, 800]  # the missing 600 is no hole: windows count checkpoints
    assert run.window(900, 3) == [400, 800, 900]
    assert run.window_ends(4) == [800, 900]
    with pytest.raises(InputError, match="would reach before the first checkpoint"):
        run.window(200, 3)


def test_a_run_too_short_for_the_largest_window_is_an_error(tmp_path):
    for step in (1, 2, 3, 4, 5):
        make_checkpoint(tmp_path / f"c{step}")
    broken = tmp_path / "c6"
    broken.mkdir()
    assert plan_run("r", str(tmp_path / "c{step}"), largest_window=3).steps == [1, 2, 3, 4, 5]
    with pytest.raises(InputError) as error:
        plan_run("r", str(tmp_path / "c{step}"), largest_window=4)
    message = str(error.value)
    assert "run r: 5 complete checkpoint(s)" in message
    assert "largest window (4) needs at least 6" in message
    assert "c6" in message  # the incomplete one is named, since it may be the missing one


def test_checkpoints_a_rule_will_write_count_as_present(tmp_path):
    make_checkpoint(tmp_path / "c10")
    run = plan_run("demo", str(tmp_path / "c{step}"), largest_window=2, produced_steps=[10, 20, 30, 40])
    assert run.steps == [10, 20, 30, 40]
    assert run.paths[30] == tmp_path / "c30"


def test_pattern_needs_the_step_placeholder_once(tmp_path):
    with pytest.raises(InputError, match="must contain the placeholder {step} exactly once"):
        discover(str(tmp_path / "checkpoint"))
    with pytest.raises(InputError, match="exactly once"):
        discover(str(tmp_path / "{step}" / "{step}"))
