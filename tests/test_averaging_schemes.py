"""Averaging schemes (uniform, wsm, ema): coefficients against hand-computed values and Megatron-LM's own function,
weighted averages against a float64 reference for safetensors and .bin members, the CLI's refusals, and the weight
distances that an average measures on the way."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpt_stability.averaging import average_checkpoints, average_or_record
from ckpt_stability.averaging_schemes import SHAPES, Scheme
from ckpt_stability.errors import InputError
from ckpt_stability.weight_movement import TOTAL, read_distances, tensor_group
from helpers import cli
from test_averaging import load_weights, save_llama, save_tensors

sys.path.insert(0, str(Path(__file__).parent / "data" / "megatron"))
import weighted_merge_reference as megatron  # noqa: E402  (Megatron-LM's function, verbatim)

WSM_1_SQRT = Scheme("wsm", shape="1-sqrt")


def test_coefficients_against_hand_computed_values():
    assert WSM_1_SQRT.coefficients([100, 200, 300, 400]) == pytest.approx([.5, .2071068, .1589186, .1339746], abs=1e-7)
    assert Scheme("wsm", shape="cosine").coefficients([1, 2, 3, 4]) == pytest.approx(
        [.1464466, .3535534, .3535534, .1464466], abs=1e-7)
    # ema: 2^(-(s_k - s_j)/h), h = 100 over steps 100..400: 1/8, 1/4, 1/2, 1, normalised by 15/8
    assert Scheme("ema", half_life=100).coefficients([100, 200, 300, 400]) == pytest.approx(
        [1 / 15, 2 / 15, 4 / 15, 8 / 15], rel=1e-15)
    # unequal spacing: x_j = (k/(k+1)) (s_j - s_0)/(s_k - s_0); steps 0, 10, 40 give x = 2/3 * (1/4, 1)
    w1, w2 = 1 - math.sqrt(1 / 6), 1 - math.sqrt(2 / 3)
    assert WSM_1_SQRT.coefficients([0, 10, 40]) == pytest.approx([1 - w1, w1 - w2, w2], rel=1e-15)
    assert Scheme("ema", half_life=30).coefficients([0, 10, 40]) == pytest.approx(
        np.array([2 ** (-40 / 30), 2 ** (-30 / 30), 1]) / sum([2 ** (-40 / 30), 2 ** (-30 / 30), 1]), rel=1e-15)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 16, 33])
@pytest.mark.parametrize("ours, theirs", [("linear", "linear"), ("1-sqrt", "minus-sqrt")])
def test_wsm_on_equal_spacing_is_megatron_lm(n, ours, theirs):
    """Megatron-LM's tools/checkpoint/weighted_merge.py spaces the checkpoints equally: so do equal steps here.
    Its first coefficient is 1 minus the sum of the others, ours 1 - w_1: they differ in the last bits only."""
    expected = megatron._schedule_to_merge_coefficients(megatron.SCHEDULES[theirs], n)
    steps = [500 + 250 * j for j in range(n)]
    assert Scheme("wsm", shape=ours).coefficients(steps) == pytest.approx(expected, abs=1e-12, rel=0)


@pytest.mark.parametrize("scheme", [Scheme(), WSM_1_SQRT, Scheme("wsm", shape="cosine"), Scheme("ema", half_life=7)])
def test_every_scheme_sums_to_one_and_a_single_checkpoint_is_itself(scheme):
    assert scheme.coefficients([42]) == [1.0]
    assert math.fsum(scheme.coefficients([3, 5, 10, 11, 20])) == pytest.approx(1, abs=1e-15)


def test_wsm_linear_is_uniform_bit_for_bit_on_equal_spacing(tmp_path):
    linear = Scheme("wsm", shape="linear")
    for n in (2, 3, 5, 6, 7):  # 1/n is inexact for all but 2: the coefficients are rounded onto it
        assert linear.coefficients(list(range(0, 10 * n, 10))) == [1 / n] * n
    members = [save_llama(tmp_path / f"checkpoint-{step}", seed=step) for step in (10, 20, 30)]
    average_checkpoints(members, tmp_path / "uniform", steps=[10, 20, 30])
    average_checkpoints(members, tmp_path / "linear", scheme=linear, steps=[10, 20, 30])
    assert (tmp_path / "uniform" / "model.safetensors").read_bytes() == \
        (tmp_path / "linear" / "model.safetensors").read_bytes()
    provenance = json.loads((tmp_path / "linear" / "averaging.json").read_text())
    assert provenance["scheme"] == {"scheme": "wsm", "shape": "linear"} and provenance["effective_step"] == 20


def weighted_reference(members: list[Path], coefficients: list[float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Σ c_j θ_j in float64, per tensor, and Σ |c_j θ_j|, the scale of the float32 accumulation's rounding."""
    weights = [load_weights(member) for member in members]
    return {name: (sum(c * w[name].double() for c, w in zip(coefficients, weights)),
                   sum(abs(c * w[name].double()) for c, w in zip(coefficients, weights))) for name in weights[-1]}


@pytest.mark.parametrize("dtype, half_ulp", [("float32", 2 ** -24), ("bfloat16", 2 ** -8)])
@pytest.mark.parametrize("scheme", [WSM_1_SQRT, Scheme("wsm", shape="cosine"), Scheme("ema", half_life=150)])
def test_weighted_average_is_the_float64_mean_to_the_output_dtype_rounding(tmp_path, scheme, dtype, half_ulp):
    """Within the output dtype's rounding, half an ulp, plus the float32 accumulation's: at most one float32
    rounding per product and per sum, relative to Σ |c_j θ_j|. The second member is a pytorch_model.bin."""
    steps = [100, 200, 400, 500]
    members = [save_llama(tmp_path / f"checkpoint-{step}", seed=step, dtype=dtype) for step in steps]
    coefficients = scheme.coefficients(steps)
    reference = weighted_reference(members, coefficients)
    as_bin = members[1]
    torch.save(load_weights(as_bin), as_bin / "pytorch_model.bin")
    (as_bin / "model.safetensors").unlink()
    average_checkpoints(members, tmp_path / "out", scheme=scheme, steps=steps)
    averaged = load_weights(tmp_path / "out")
    for name, (expected, scale) in reference.items():
        assert averaged[name].dtype == getattr(torch, dtype)
        error = (averaged[name].double() - expected).abs()
        accumulation = 2 * len(steps) * 2 ** -24 * scale
        assert (error <= half_ulp * (expected.abs() + accumulation) + accumulation).all(), name
    provenance = json.loads((tmp_path / "out" / "averaging.json").read_text())
    assert [member["coefficient"] for member in provenance["members"]] == coefficients
    assert provenance["effective_step"] == pytest.approx(sum(c * s for c, s in zip(coefficients, steps)))
    assert provenance["definition"].startswith("weighted mean")


def test_weighted_arithmetic_is_float32_products_summed_left_to_right(tmp_path):
    """Bit for bit: each c_j rounded to float32, each product and sum rounded (the module's definition)."""
    rng = np.random.default_rng(0)
    steps = [1, 2, 5]
    values = [rng.standard_normal(1000).astype(np.float32) for _ in steps]
    members = [save_tensors(tmp_path / f"m{j}", {"w": torch.from_numpy(v)}) for j, v in enumerate(values)]
    scheme = Scheme("ema", half_life=2)
    average_checkpoints(members, tmp_path / "out", scheme=scheme, steps=steps)
    c = np.array(scheme.coefficients(steps), np.float32)
    expected = c[0] * values[0]
    for j in (1, 2):
        expected = expected + c[j] * values[j]
    assert load_weights(tmp_path / "out")["w"].numpy().tobytes() == expected.tobytes()


@pytest.mark.parametrize("arguments, message", [
    (["--scheme", "wsm", "--shape", "square"], "argument --shape: invalid choice: 'square'"),
    (["--scheme", "wsm"], "scheme wsm needs one"),
    (["--scheme", "ema", "--half-life", "0"], "argument --half-life: not a positive number: '0'"),
    (["--scheme", "ema", "--half-life", "-3"], "argument --half-life: not a positive number: '-3'"),
    (["--scheme", "ema"], "scheme ema needs one"),
    (["--scheme", "uniform", "--shape", "linear"], "a shape goes with scheme wsm"),
    (["--scheme", "wsm", "--shape", "linear", "--steps", "100", "300", "200"], "steps must be strictly increasing"),
    (["--scheme", "wsm", "--shape", "linear", "--steps", "100", "200"], "2 steps ([100, 200]) given for 3"),
    (["--scheme", "ema", "--half-life", "5"], "its coefficients depend on the checkpoints' steps"),
])
def test_bad_scheme_parameters_are_refused_before_anything_is_read(tmp_path, arguments, message):
    missing = [str(tmp_path / f"missing-{k}") for k in range(3)]  # nothing to read: a refusal comes first
    result = cli("average", *arguments, "--output", str(tmp_path / "out"), *missing)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_the_command_line_writes_the_coefficients_and_the_distances(tmp_path):
    steps = [100, 200, 300, 400]
    members = [save_llama(tmp_path / f"checkpoint {step}", seed=step) for step in steps]
    result = cli("average", "--scheme", "wsm", "--shape", "1-sqrt", "--steps", *map(str, steps), "--output",
                 str(tmp_path / "out"), "--diagnostics", str(tmp_path / "distances.json"), *map(str, members))
    assert result.returncode == 0, result.stderr
    provenance = json.loads((tmp_path / "out" / "averaging.json").read_text())
    assert [m["coefficient"] for m in provenance["members"]] == pytest.approx([.5, .2071068, .1589186, .1339746])
    distances = read_distances(tmp_path / "distances.json")
    assert distances.steps == steps and set(distances.pairs) == {TOTAL, "embeddings", "attention", "mlp", "norms",
                                                                 "head"}


def test_tensor_groups_by_name():
    assert [tensor_group(name) for name in [
        "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.mlp.gate_proj.weight", "model.norm.weight", "lm_head.weight", "transformer.wte.weight",
        "transformer.h.0.ln_1.bias", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight",
        "gpt_neox.embed_out.weight", "rotary.inv_freq"]] == [
        "embeddings", "attention", "norms", "norms", "norms", "mlp", "norms", "head", "embeddings", "norms",
        "attention", "mlp", "head", "other"]


def test_distances_on_known_tensors_are_exact(tmp_path):
    """Three checkpoints of known tensors; every figure is checked against its definition in float64, and the
    distances do not depend on the scheme, the thread count or the chunking (a tensor of several chunks)."""
    big = 300_000  # more than one chunk (averaging.CHUNK_ELEMENTS = 262144)
    rng = np.random.default_rng(1)
    base = {"embed.weight": rng.standard_normal(big), "layers.0.attn.weight": rng.standard_normal(64),
            "layers.0.mlp.weight": rng.standard_normal(32), "norm.weight": np.ones(8)}
    checkpoints = []
    for j in range(3):
        tensors = {name: (value + 0.01 * (j + 1) ** 2 * rng.standard_normal(value.shape)).astype(np.float32)
                   for name, value in base.items()}
        tensors["norm.weight"] = np.full(8, 1.0 + j, np.float32)
        checkpoints.append(tensors)
    members = [save_tensors(tmp_path / f"m{j}", {**{k: torch.from_numpy(v) for k, v in t.items()},
                                                 "count": torch.tensor([7])}) for j, t in enumerate(checkpoints)]
    steps = [10, 20, 30]
    for scheme, threads in [(Scheme(), 1), (WSM_1_SQRT, 2)]:
        out = tmp_path / f"out-{threads}"
        average_checkpoints(members, out, scheme=scheme, steps=steps, threads=threads,
                            diagnostics=tmp_path / f"d-{threads}.json")
        distances = read_distances(tmp_path / f"d-{threads}.json")
        c = np.array(scheme.coefficients(steps), np.float32)
        if scheme == Scheme():  # the average in float32, as the averager computes it
            average = {name: (checkpoints[0][name] + checkpoints[1][name] + checkpoints[2][name]) / np.float32(3)
                       for name in checkpoints[0]}
        else:
            average = {name: c[0] * checkpoints[0][name] + c[1] * checkpoints[1][name] + c[2] * checkpoints[2][name]
                       for name in checkpoints[0]}
        groups = {"embeddings": ["embed.weight"], "attention": ["layers.0.attn.weight"],
                  "mlp": ["layers.0.mlp.weight"], "norms": ["norm.weight"], TOTAL: list(checkpoints[0])}
        for group, names in groups.items():
            def norm(arrays):
                return math.sqrt(sum(float(np.sum(np.square(a.astype(np.float64)))) for a in arrays))
            pairs = [norm([checkpoints[j][n].astype(np.float64) - checkpoints[j - 1][n] for n in names])
                     / norm([checkpoints[j - 1][n] for n in names]) for j in (1, 2)]
            assert distances.pairs[group] == pytest.approx(pairs, rel=1e-12), group
            to_average = np.mean([norm([checkpoints[j][n].astype(np.float64) - average[n] for n in names])
                                  / norm([average[n] for n in names]) for j in range(3)])
            assert distances.to_average[group] == pytest.approx(to_average, rel=1e-12), group
        assert distances.pairs["norms"] == pytest.approx([1.0, 0.5], rel=1e-15)  # 1 -> 2 -> 3
    assert read_distances(tmp_path / "d-1.json").pairs == read_distances(tmp_path / "d-2.json").pairs


def test_an_unusable_member_records_its_reason_in_the_distances_file(tmp_path):
    members = [save_tensors(tmp_path / f"m{j}", {"w": torch.full((4,), float(j))}) for j in range(2)]
    save_tensors(members[1], {"w": torch.tensor([1.0, math.nan, 0.0, 0.0])})
    average_or_record(members, tmp_path / "out", record_unusable=True, steps=[1, 2], diagnostics=tmp_path / "d.json")
    assert read_distances(tmp_path / "d.json") is None
    assert "holds nan" in json.loads((tmp_path / "d.json").read_text())["excluded"]


def test_schemes_refuse_bad_parameters_naming_them():
    with pytest.raises(InputError, match="shape 'square' is not one of linear, 1-sqrt, cosine"):
        Scheme("wsm", shape="square")
    with pytest.raises(InputError, match="half_life must be a positive number of steps, got 0"):
        Scheme("ema", half_life=0)
    with pytest.raises(InputError, match=r"steps must be strictly increasing .* got \[3, 3\]"):
        Scheme().coefficients([3, 3])
    assert set(SHAPES) == {"linear", "1-sqrt", "cosine"}
