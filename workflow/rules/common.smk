"""Checkpoint discovery, windows, input functions and the final targets.

Runs are discovered while the workflow is parsed: every complete checkpoint directory matching a
run's pattern is in the DAG; a checkpoint still being copied is left out with a warning and picked up
by the next invocation. The demo's checkpoints are written by a rule of this workflow, so they count as
present from the start and a dry run shows every job.
"""

import dataclasses
import json
import os
import re
import shlex
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate
from snakemake_interface_executor_plugins.settings import DeploymentMethod, ExecMode

from ckpt_stability.config import check_tasks, check_unique_keys, plan_finetuning, plan_runs
from ckpt_stability.config import task_path as config_task_path
from ckpt_stability.demo import FINETUNE_TASK as DEMO_FINETUNE_TASK
from ckpt_stability.demo import MODEL_SIZES as DEMO_MODEL_SIZES
from ckpt_stability.demo import DemoSettings
from ckpt_stability.demo import TASK_NAMES as DEMO_TASK_NAMES
from ckpt_stability.engine import ENVIRONMENT as ENGINE_ENVIRONMENT
from ckpt_stability.engine import environment_value as engine_environment_value
from ckpt_stability.engine import stop_engines
from ckpt_stability.errors import InputError
from ckpt_stability.instruction_data import read_instruction_data
from ckpt_stability import layout
from ckpt_stability.gpus import visible_gpus
from ckpt_stability.methods import AVG, ENSEMBLE, EVALUATE, RAW, registry
from ckpt_stability.plan import Plan
from ckpt_stability.metrics import DEFAULT_STOP


def config_error(key, message):
    """A config mistake, naming the file and the key that hold it."""
    files = workflow.overwrite_configfiles or workflow.configfiles  # --configfile replaces the default
    return WorkflowError(f"Invalid config in {', '.join(map(str, files))}: {key}: {message}")


def _validate_config():
    """The config against the schema, and the methods against their registry, which holds the configured averaging
    methods. Returns the registry."""
    try:
        validate(config, "../schemas/config.schema.yaml")
    except WorkflowError as error:
        mistake = error.__context__  # the jsonschema ValidationError it was raised from
        key = mistake.json_path.removeprefix("$").removeprefix(".") or "top level"
        raise config_error(key, mistake.message) from None
    for name, settings in config["averaging"].items():
        try:
            registry({name: settings})
        except (InputError, ValueError) as error:
            raise config_error(f"averaging.{name}", str(error)) from None
        for n in settings.get("windows", []):
            if n not in config["windows"]:
                raise config_error(f"averaging.{name}.windows", f"{n} is not one of windows {config['windows']}")
    methods = registry(config["averaging"])
    # the schema leaves the methods' names to their registry (src/ckpt_stability/methods.py)
    names = [method.name for method in methods.stabilisers]
    config.setdefault("methods", names)
    for name in config["methods"]:
        if name not in names:
            raise config_error("methods", f"{name!r} is not one of {names}")
    return methods


METHODS = _validate_config()

DEMO_ROOT = "results/demo"
# the demo's runs: checkpoints that a rule of this workflow writes
DEMO_PATTERNS = {f"{DEMO_ROOT}/{size}/checkpoint-{{step}}" for size in DEMO_MODEL_SIZES}
CPU_ENV = "../../envs/cpu.yaml"
GPU_ENV = "../../envs/gpu.yaml"
if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    # `python` in the rules' commands is the interpreter that runs this workflow, whatever PATH says (a venv's
    # snakemake started from cron, say); under --sdm conda it is the rule's conda env's. Snakemake formats the
    # prefix, hence the doubled braces.
    shell.prefix(f'set -euo pipefail; python() {{{{ {shlex.quote(sys.executable)} "$@"; }}}}; ')

WINDOWS = sorted(set(config["windows"]) | {1})
LARGEST_WINDOW = max(WINDOWS)
TASKS = list(config["tasks"])
ENSEMBLE_METHODS = [method.name for method in METHODS.produced_by(ENSEMBLE) if method.name in config["methods"]]
GPUS = visible_gpus()
# Jobs run on this machine, not through a cluster's executor (which needs --jobs) nor as a job's own
# Snakemake there
RUNS_HERE = workflow.nodes is None and workflow.exec_mode == ExecMode.DEFAULT
# Inference jobs take a GPU where this machine has one (either backend runs on it); on a cluster, the vllm
# backend's jobs take one anyway (profiles/slurm asks for one per inference job). vLLM on a machine without
# GPUs runs on its CPU (vLLM's CPU build).
INFERENCE_ON_GPU = bool(GPUS) or (config["backend"] == "vllm" and not RUNS_HERE)


def _default_gpu_resource():
    """On a workstation, run at most as many GPU jobs at once as this machine has GPUs, without the user
    counting them: the global resource `gpu` defaults to the number of visible GPUs unless `--resources
    gpu=N` set it (each GPU job then pins one, see ckpt_stability.gpus). Not on a cluster: Slurm hands out
    the GPUs."""
    if "gpu" not in workflow.global_resources and RUNS_HERE:
        workflow.register_resource("gpu", len(GPUS))


_default_gpu_resource()


def demo_steps():
    """The steps of the checkpoints that the demo's pretraining writes."""
    demo = config.get("demo")
    if not demo:
        return []
    return DemoSettings(train_steps=demo["train_steps"], save_every=demo["save_every"]).checkpoint_steps()


def task_path(task):
    return config_task_path(task, config.get("task_dir"))


FINETUNE = config.get("finetune")


def _read_inputs():
    """The task files, the fine-tuning data and the runs' checkpoints: a config problem is a clear error now,
    before any job runs."""
    try:
        for path in workflow.configfiles:
            check_unique_keys(path)
        check_tasks(config["tasks"], config.get("task_dir"), written_under=DEMO_ROOT)
        if FINETUNE:
            check_tasks(FINETUNE["tasks"], config.get("task_dir"), written_under=DEMO_ROOT)
            if not FINETUNE["data"].startswith(DEMO_ROOT):
                read_instruction_data(FINETUNE["data"])
        return plan_runs(config["runs"], LARGEST_WINDOW, {pattern: demo_steps() for pattern in DEMO_PATTERNS})
    except InputError as error:
        raise WorkflowError(str(error)) from None


RUNS = _read_inputs()


def _plan_finetuning():
    """run -> the steps of the checkpoints that are fine-tuned (empty without the finetune stage)."""
    if not FINETUNE:
        return {}
    for n in FINETUNE["windows"]:
        if n > 1 and (
            n not in WINDOWS or AVG.name not in config["methods"] or n not in (METHODS[AVG.name].windows or [n])
        ):
            needs = (
                f"needs window {n} in windows (and in averaging.{AVG.name}.windows if set) and {AVG.name} in methods"
            )
            raise config_error("finetune.windows", f"{n}: fine-tuning an averaged model {needs}")
    try:
        return plan_finetuning({name: run.steps for name, run in RUNS.items()}, FINETUNE)
    except InputError as error:
        raise WorkflowError(str(error)) from None


FINETUNED_STEPS = _plan_finetuning()


wildcard_constraints:
    run="|".join(map(re.escape, RUNS)),
    task="|".join(map(re.escape, TASKS)),
    step=r"\d+",
    n=r"\d+",


# ---------------------------------------------------------------- windows and input functions


def window_steps(wildcards):
    """The member steps of the window of size n ending at step (comma-separated, for params)."""
    return ",".join(map(str, RUNS[wildcards.run].window(int(wildcards.step), int(wildcards.n))))


def window_checkpoints(wildcards):
    run = RUNS[wildcards.run]
    return [str(run.average_member(step)) for step in run.window(int(wildcards.step), int(wildcards.n))]


def checkpoint_dir(wildcards):
    """The Hugging Face directory of a raw checkpoint: the checkpoint, or its conversion (rule convert)."""
    return str(RUNS[wildcards.run].model_path(int(wildcards.step)))


def native_checkpoint(wildcards):
    """The checkpoint that rule convert converts, as its trainer left it."""
    return str(RUNS[wildcards.run].paths[int(wildcards.step)])


def converted_output(path):
    return directory(path) if config["keep_converted"] else temp(directory(path))


CONVERTED_RUNS = [name for name, run in RUNS.items() if run.converted]
COMMAND_CONVERTED_RUNS = [name for name in CONVERTED_RUNS if RUNS[name].convert is not None]
"""the converted runs whose averages read the conversions (the others read torch.distributed checkpoints in place)"""


def converter_option(wildcards):
    """The convert rule's converter for a run, shell-quoted: its command, or the config and tokenizer that go with
    the torch.distributed checkpoints read in place."""
    run = RUNS[wildcards.run]
    if run.convert is not None:
        return f"--command {shlex.quote(run.convert)}"
    return f"--assets {shlex.quote(str(run.hf_assets))}"


def conversion_priority(wildcards):
    """Negative, the earlier steps higher (see rule convert)."""
    return -1 - RUNS[wildcards.run].steps.index(int(wildcards.step))


def assets_option(wildcards):
    """For averages of torch.distributed checkpoints read in place: where config.json and the tokenizer are."""
    assets = RUNS[wildcards.run].hf_assets
    return "" if assets is None else f"--assets {shlex.quote(str(assets))}"


def trailing_converted_steps():
    """The steps of each converted run's last (largest window - 1) checkpoints, whose conversions are kept by
    convert_trailing, since the windows of the run's next checkpoint read them again and a conversion written
    anew would rerun every job that read it. The others are temporary (unless keep_converted). A step that is
    trailing in one run keeps its conversion in every such run (a wildcard constraint cannot pair run and step).
    A run whose torch.distributed checkpoints are read in place keeps none: its averages read the checkpoints."""
    if config["keep_converted"] or LARGEST_WINDOW == 1:
        return []
    return sorted({step for name in COMMAND_CONVERTED_RUNS for step in RUNS[name].steps[1 - LARGEST_WINDOW :]})


def task_files():
    return [task_path(task) for task in config["tasks"].values()]


def evaluation_settings(tasks):
    """Everything that shapes the prompts and their scoring of ``tasks`` (config key tasks, or the fine-tuning's
    target tasks): equal for every model evaluated on them."""
    prompt = dict(config["prompt"])
    stop = prompt.pop("stop", list(DEFAULT_STOP))
    add_special_tokens = prompt.pop("add_special_tokens")
    tasks = {name: {**task, "path": task_path(task)} for name, task in tasks.items()}
    return {"tasks": tasks, "prompt": prompt, "stop": stop, "add_special_tokens": add_special_tokens}


def averaged_output(path):
    return directory(path) if config["keep_averaged"] else temp(directory(path))


def model_dir(wildcards):
    """The model that an evaluated method's job evaluates: the checkpoint itself, or the one built for it."""
    if wildcards.method == RAW.name:
        return checkpoint_dir(wildcards)
    return layout.fill(layout.AVERAGED, run=wildcards.run, method=wildcards.method, n=wildcards.n, step=wildcards.step)


def ensemble_outputs(method):
    """An ensemble method's prediction files, one per task it covers, as patterns of {run}, {n} and {step}."""
    modes = {name: task["mode"] for name, task in config["tasks"].items()}
    return [layout.predictions(method=method, task=task) for task in METHODS.covered_tasks(method, modes)]


def window_raw_predictions(wildcards):
    """The ensemble's inputs: one prediction file of each raw evaluation in the window (it reads them all, from
    window_raw_dirs). One output of a job stands for the job: when the job reruns, all its files are new and
    the ensemble reruns too; a missing file is requested by rule scores, which lists every one. One file per
    member rather than one per task keeps the DAG of long runs small (see benchmarks/bench_dag.py)."""
    run = RUNS[wildcards.run]
    return prediction_files(wildcards.run, RAW.name, 1, run.window(int(wildcards.step), int(wildcards.n)), TASKS[:1])


def window_raw_dirs(wildcards):
    run = RUNS[wildcards.run]
    return [
        str(PLAN.path(wildcards.run, RAW.name, 1, step, TASKS[0]).parent)
        for step in run.window(int(wildcards.step), int(wildcards.n))
    ]


# ---------------------------------------------------------------- targets


PLAN = Plan(
    runs={name: run.steps for name, run in RUNS.items()},
    windows=WINDOWS,
    methods=config["methods"],
    averaging=config["averaging"],
    tasks={name: {"category": task["category"], "mode": task["mode"]} for name, task in config["tasks"].items()},
    final_fraction=config["final_fraction"],
)


def prediction_files(run, method, n, steps, tasks):
    return [str(PLAN.path(run, method, n, step, task)) for step in steps for task in tasks]


def all_prediction_files():
    return [
        file
        for name in RUNS
        for method, n, steps, tasks in PLAN.series(name)
        for file in prediction_files(name, method, n, steps, tasks)
    ]


def perplexity_input():
    """The held-out text as an input of the evaluate rule, when one is configured."""
    return {"heldout": config["perplexity_text"]} if config.get("perplexity_text") else {}


def perplexity_output():
    return {"perplexity": layout.perplexity()} if config.get("perplexity_text") else {}


def perplexity_options(wildcards, input, output):
    if not config.get("perplexity_text"):
        return ""
    return f"--perplexity-text {shlex.quote(input.heldout)} --perplexity-output {shlex.quote(output.perplexity)}"


# An evaluation job's command (rules evaluate and evaluate_finetuned, with the params of inference_params()),
# to which each rule adds its own options and its log.
EVALUATE_COMMAND = (
    "python -m ckpt_stability evaluate --model {input.model:q} --settings {input.settings:q}"
    " --output-dir {params.output_dir:q} --backend {params.backend} --dtype {params.dtype}"
    " --batch-size {params.batch_size} --threads {threads} --record-unusable"
    " --meta run={wildcards.run:q} --meta method={wildcards.method} --meta window={wildcards.n}"
    " --meta step={wildcards.step}"
)


def inference_params():
    """The params that EVALUATE_COMMAND reads."""
    return {
        "output_dir": lambda wildcards, output: os.path.dirname(output.predictions[0]),
        "backend": config["backend"],
        "dtype": config["dtype"],
        "batch_size": config["batch_size"],
    }


def set_engine_environment():
    """The evaluation engine's settings (config key engine), for the evaluation jobs, which inherit them."""
    engine = config["engine"]
    if engine["enabled"]:
        os.environ[ENGINE_ENVIRONMENT] = engine_environment_value(engine["idle_timeout"], engine["vllm"])
    else:
        os.environ.pop(ENGINE_ENVIRONMENT, None)


set_engine_environment()


def end_engines():
    """End the evaluation engines of this workflow's jobs on this machine, once the workflow is done (on a
    cluster, those of each Slurm job end with it)."""
    if config["engine"]["enabled"]:
        stop_engines()


def perplexity_files():
    """Every evaluated (raw and averaged) model's perplexity file, when a held-out text is configured."""
    if not config.get("perplexity_text"):
        return []
    return [
        layout.perplexity(run=name, method=method, n=n, step=step)
        for name in RUNS
        for method, n, steps, _ in PLAN.series(name)
        if METHODS[method].produced_by == EVALUATE
        for step in steps
    ]


def evaluated_methods():
    """The methods whose files rule evaluate writes, as a wildcard constraint."""
    return "|".join(map(re.escape, (method.name for method in METHODS.produced_by(EVALUATE))))


def averaging_methods():
    """The methods whose models rule average builds, as a wildcard constraint."""
    return "|".join(map(re.escape, (method.name for method in METHODS.averaging)))


def averaging_options(wildcards):
    """The scheme of an averaging method as options of `ckpt-stability average`."""
    scheme = METHODS[wildcards.method].scheme
    options = f"--scheme {scheme.scheme}"
    if scheme.shape is not None:
        options += f" --shape {shlex.quote(scheme.shape)}"
    if scheme.half_life is not None:
        options += f" --half-life {scheme.half_life!r}"
    return options


def weight_distance_files():
    """The weight distances that every average measures (rule average), which rule weights gathers."""
    return [
        layout.fill(layout.WEIGHT_DISTANCES, run=name, method=method, n=n, step=step)
        for name in RUNS
        for method, n, steps, _ in PLAN.series(name)
        if METHODS[method].scheme is not None
        for step in steps
    ]


def indicator_targets():
    """The indicators' target: the user's CSV (config key targets), else the fine-tuning stage's outcomes, else
    none (each run's final stabilised score stands in)."""
    if config.get("targets"):
        return config["targets"]
    return layout.TARGETS if FINETUNE else []


# ---------------------------------------------------------------- fine-tuning


def finetuned_models():
    """(run, method, window, step) of every model the fine-tuning stage fine-tunes."""
    return [
        (name, RAW.name if n == 1 else AVG.name, n, step)
        for name, steps in FINETUNED_STEPS.items()
        for n in FINETUNE["windows"]
        for step in steps
        if step in RUNS[name].window_ends(n)
    ]


def finetune_records():
    return [
        layout.fill(layout.FINETUNE_RECORD, run=name, method=method, n=n, step=step)
        for name, method, n, step in finetuned_models()
    ]


def finetuned_prediction_files():
    return [
        layout.predictions(layout.FINETUNE_DIR, run=name, method=method, n=n, step=step, task=task)
        for name, method, n, step in finetuned_models()
        for task in FINETUNE["tasks"]
    ]


def finetuned_output(path):
    return directory(path) if FINETUNE["keep"] else temp(directory(path))


def finetune_options():
    """The recipe (config key finetune.recipe) and the prompt layout as options of `ckpt-stability finetune`."""
    recipe = FINETUNE["recipe"]
    scalars = ("steps", "epochs", "learning_rate", "batch_size", "seed")
    options = [f"--{key.replace('_', '-')} {recipe[key]}" for key in scalars if key in recipe]
    options += [f"--lora-{key} {value}" for key, value in recipe.get("lora", {}).items()]
    template = {key: value for key, value in config["prompt"].items() if key in ("header", "example")}
    if template:
        options.append(f"--prompt {shlex.quote(json.dumps(template, ensure_ascii=False))}")
    if not config["prompt"]["add_special_tokens"]:
        options.append("--no-special-tokens")
    return " ".join(options)


def indicator_options(wildcards, input):
    options = f"--perplexity-dir {layout.PERPLEXITY_DIR}" if input.perplexity else ""
    return options + (f" --targets {shlex.quote(input.targets)}" if input.targets else "")


# ---------------------------------------------------------------- export to trackers

EXPORT = config.get("export", {})
"""tracker -> its settings (config key export)"""


def export_options(wildcards, input):
    """The options of `ckpt-stability export <tracker>`: the perplexity and fine-tuning inputs, given as the
    indicators get them, and the tracker's settings (config key export.<tracker>)."""
    settings = EXPORT[wildcards.tracker].items()
    tracker = " ".join(f"--{key.replace('_', '-')} {shlex.quote(str(value))}" for key, value in settings)
    return f"{indicator_options(wildcards, input)} {tracker}"


def final_targets():
    return [
        "results/scores.parquet",
        "results/tables/stability.csv",
        "results/tables/improvement.csv",
        "results/tables/pick.csv",
        "results/tables/indicators.csv",
        layout.WEIGHTS,
        "results/report/report.html",
        *([layout.TARGETS] if FINETUNE else []),
        *(layout.fill(layout.EXPORT_RECEIPT, tracker=tracker) for tracker in EXPORT),
    ]
