"""The method registry and the output layout drive everything: the config schema, the plan, the ensembles, the
command line, the report; and the --meta values keep their types."""

import re

import jsonschema
import pytest
import yaml

from ckpt_stability import layout
from ckpt_stability.cli import _meta, build_parser
from ckpt_stability.ensemble import COMBINERS
from ckpt_stability.errors import InputError
from ckpt_stability.averaging_schemes import Scheme
from ckpt_stability.methods import AVG, BUILTIN, ENSEMBLE, EVALUATE, RAW, registry
from ckpt_stability.plan import Plan
from helpers import ROOT, snakemake

TASKS = {"c": {"category": "C", "mode": "choice"}, "g": {"category": "G", "mode": "generate"}}
AVERAGING = {"wsm": {"scheme": "wsm", "shape": "1-sqrt", "windows": [2]}, "ema": {"scheme": "ema", "half_life": 50}}
METHODS = registry(AVERAGING)


def test_the_config_offers_exactly_the_registrys_methods(tmp_path):
    """The schema leaves the methods to the registry: the workflow takes all of them by default and refuses
    any other name, naming the file and the key."""
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert "enum" not in schema["properties"]["methods"]["items"]
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    del config["methods"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry_run = snakemake(tmp_path, "--dry-run", "--quiet", "rules")
    assert dry_run.returncode == 0, dry_run.stderr
    assert all(re.search(rf"^{rule}\s", dry_run.stdout, re.M) for rule in ("average", "ensemble"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**config, "methods": ["avg", "ema"]}))
    refused = snakemake(tmp_path, "--dry-run")
    assert refused.returncode != 0
    assert f"Invalid config in {tmp_path / 'config.yaml'}: methods: 'ema' is not one of " \
           f"{[method.name for method in registry(config['averaging']).stabilisers]}" in refused.stdout + refused.stderr


@pytest.mark.parametrize("averaging, message", [
    ({"wsm": {"scheme": "wsm"}}, "averaging.wsm: shape None: a shape goes with scheme wsm, and scheme wsm needs one"),
    ({"wsm": {"scheme": "wsm", "shape": "1-sqrt", "windows": [3]}}, "averaging.wsm.windows: 3 is not one of windows"),
])
def test_averaging_methods_are_checked_when_the_workflow_starts(tmp_path, averaging, message):
    """Through the workflow, a mistake the registry finds and one the workflow's windows show (the schema's own
    refusals, below, reach the user as every schema refusal does)."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config.update(averaging=averaging, methods=["avg"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    refused = snakemake(tmp_path, "--dry-run")
    assert refused.returncode != 0
    assert f"Invalid config in {tmp_path / 'config.yaml'}: {message}" in refused.stdout + refused.stderr


@pytest.mark.parametrize("averaging, message", [
    ({"ema": {"scheme": "ema", "half_life": 0}}, "0 is less than or equal to the minimum of 0"),
    ({"ema2": {"scheme": "ema", "half_life": 3}}, "'ema2' does not match"),
    ({"ema": {"scheme": "ema", "half_life": 3, "windows": [1]}}, "1 is less than the minimum of 2"),
])
def test_the_schema_refuses_bad_averaging_methods(averaging, message):
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    with pytest.raises(jsonschema.ValidationError, match=re.escape(message)):
        jsonschema.validate({"runs": {"r": "c-{step}"}, "windows": [1], "averaging": averaging,
                             "tasks": {"t": {"path": "t.json", "category": "C", "mode": "choice"}}}, schema)


@pytest.mark.parametrize("averaging, message", [
    ({"avg": {"scheme": "ema", "half_life": 3}}, "avg is the uniform mean"),
    ({"vote": {"scheme": "uniform"}}, "vote is a built-in method's name"),
])
def test_avg_stays_uniform_and_built_in_names_stay_theirs(averaging, message):
    with pytest.raises(ValueError, match=message):
        registry(averaging)


def test_raw_comes_first_and_every_method_is_produced_by_one_stage():
    assert METHODS.methods[0] is RAW and RAW not in METHODS.stabilisers
    assert METHODS.names == ["raw", "avg", "wsm", "ema", "vote", "prob"]
    assert METHODS.produced_by(EVALUATE) + METHODS.produced_by(ENSEMBLE) == sorted(
        METHODS.methods, key=lambda m: m.produced_by != EVALUATE)
    assert [m.name for m in METHODS.averaging] == ["avg", "wsm", "ema"]
    assert METHODS["wsm"].scheme == Scheme("wsm", shape="1-sqrt") and METHODS["wsm"].windows == (2,)
    assert METHODS[AVG.name] == AVG and registry().methods == BUILTIN.methods


def test_the_plan_series_are_the_registrys_methods_in_order_on_the_tasks_they_cover():
    plan = Plan(runs={"r": [10, 20, 30, 40]}, windows=[1, 2, 3], averaging=AVERAGING,
                methods=[m.name for m in reversed(METHODS.stabilisers)], tasks=TASKS)
    series = plan.series("r")
    assert [(method, window) for method, window, *_ in series] == [
        ("raw", 1), ("avg", 2), ("wsm", 2), ("ema", 2), ("vote", 2), ("prob", 2),
        ("avg", 3), ("ema", 3), ("vote", 3), ("prob", 3)]  # wsm: window 2 only
    for method, window, steps, tasks in series:
        assert steps == [10, 20, 30, 40][window - 1:]
        assert tasks == [name for name, task in TASKS.items() if METHODS[method].covers(task["mode"])]
    ema = Scheme("ema", half_life=50)
    assert plan.coefficients("r", "ema", 3, 40) == ([20, 30, 40], ema.coefficients([20, 30, 40]))
    assert plan.coefficients("r", "vote", 2, 30) == ([20, 30], [0.5, 0.5])
    assert plan.effective_step("r", "raw", 1, 30) == 30 and plan.effective_step("r", "avg", 3, 40) == 30


def test_each_ensemble_method_has_its_function_and_its_command_line_option():
    assert list(COMBINERS) == [method.name for method in BUILTIN.produced_by(ENSEMBLE)]
    args = build_parser().parse_args(["ensemble", "m1", "m2", "--tasks", "t", *(f"--{name}-dir=out-{name}"
                                                                                 for name in COMBINERS)])
    assert {name: getattr(args, f"{name}_dir") for name in COMBINERS} == {name: f"out-{name}" for name in COMBINERS}


def test_the_report_tells_every_method_apart():
    methods = registry({f"scheme_{k}_": {"scheme": "ema", "half_life": k + 1} for k in range(5)}).methods
    assert len({method.color for method in methods}) == len({method.label for method in methods}) == len(methods)
    assert len({(method.style["marker"], method.style["ls"]) for method in methods if method is not RAW}) \
        == len(methods) - 1


def test_method_names_are_spelled_in_the_registry_only():
    """Elsewhere, code asks the registry (methods.py); a docstring or comment may still name a method."""
    files = [path for folder in ("src", "workflow") for path in (ROOT / folder).rglob("*")
             if path.is_file() and path.suffix in {".py", ".smk", ".j2", ""} and "egg-info" not in str(path)
             and path.name != "methods.py"] + [ROOT / "Snakefile"]
    literals = re.compile("|".join(f"([\"']){re.escape(method.name)}\\1" for method in BUILTIN.methods))
    assert [str(path.relative_to(ROOT)) for path in files if literals.search(path.read_text(errors="replace"))] == []


def test_layout_templates_serve_python_and_the_rules_alike(tmp_path):
    assert layout.predictions(method="vote", task="t") == "results/predictions/{run}/vote{n}/step{step}/t.parquet"
    plan = Plan(runs={"r": [10]}, windows=[1], methods=[], tasks=TASKS, predictions=str(tmp_path))
    assert plan.path("r", RAW.name, 1, 10, "c") == tmp_path / "r" / "raw1" / "step10" / "c.parquet"
    assert layout.fill(layout.AVERAGED, method="avg", n=2) == "results/averaged/{run}/avg2/step{step}"
    assert layout.perplexity(run="r", method="avg", n=2, step=20) == "results/perplexity/r/avg2/step20.json"


def test_meta_values_have_fixed_types():
    meta = _meta(["run=2024", "method=avg", "window=2", "step=30", "members=20,30", "note=1.5"])
    assert meta == {"run": "2024", "method": "avg", "window": 2, "step": 30, "members": [20, 30], "note": "1.5"}
    assert _meta(["members=30"]) == {"members": [30]}
    with pytest.raises(InputError, match="step must be an integer"):
        _meta(["step=last"])
