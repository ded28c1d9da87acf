"""The ``ckpt-stability`` command: one subcommand per workflow stage, each usable on its own."""

from __future__ import annotations

import argparse
import json
import re
import logging
import sys
from pathlib import Path

from ckpt_stability import __version__
from ckpt_stability.averaging_schemes import SCHEMES, SHAPES, UNIFORM
from ckpt_stability.errors import InputError, reported
from ckpt_stability.methods import BUILTIN, ENSEMBLE

log = logging.getLogger("ckpt_stability")


def _demo_data(args: argparse.Namespace) -> None:
    from ckpt_stability.demo import DemoSettings, write_data

    write_data(Path(args.output), DemoSettings(seed=args.seed, samples_per_task=args.samples))


def _demo_train(args: argparse.Namespace) -> None:
    from ckpt_stability.demo import MODEL_SIZES, DemoSettings, train_run

    settings = DemoSettings(seed=args.seed, train_steps=args.steps, save_every=args.save_every, threads=args.threads)
    train_run(Path(args.data), Path(args.output), settings, MODEL_SIZES[args.size])


def _steps(text: str) -> list[int]:
    """Comma-separated steps."""
    return [int(step) for step in text.split(",")]


META_TYPES = {"run": str, "method": str, "window": int, "step": int, "members": _steps}
"""The type of each known --meta key (members: comma-separated steps); any other key's value is a string."""


def _meta(items: list[str]) -> dict:
    """KEY=VALUE pairs, each VALUE of its key's type (META_TYPES)."""
    meta = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            meta[key] = META_TYPES.get(key, str)(value)
        except ValueError:
            expected = "comma-separated integers" if META_TYPES[key] is _steps else "an integer"
            raise InputError(f"--meta {item}: {key} must be {expected}") from None
    return meta


def _positive(text: str) -> float:
    """A positive, finite number (of seconds, of steps)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return value


def _size(text: str) -> int:
    """A byte count like 5GB, 500MB, 2GiB or 1000000."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in units:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def _average(args: argparse.Namespace) -> None:
    from ckpt_stability.averaging import average_or_record
    from ckpt_stability.averaging_schemes import Scheme

    scheme = Scheme(args.scheme, shape=args.shape, half_life=args.half_life)
    steps = [step for steps in args.steps for step in steps] if args.steps else None
    average_or_record([Path(p) for p in args.checkpoints], Path(args.output), record_unusable=args.record_unusable,
                      scheme=scheme, dtype=args.dtype, max_shard_size=args.max_shard_size, steps=steps,
                      threads=args.threads, assets=Path(args.assets) if args.assets else None,
                      diagnostics=Path(args.diagnostics) if args.diagnostics else None)


def _weights(args: argparse.Namespace) -> None:
    from ckpt_stability.weight_movement import write_weights_table

    write_weights_table(Path(args.plan), Path(args.output))


def _convert(args: argparse.Namespace) -> None:
    from ckpt_stability.conversion import convert

    convert(args.command, Path(args.checkpoint), Path(args.output), args.step, args.run,
            assets=Path(args.assets) if args.assets else None)


def _evaluation_job(args: argparse.Namespace):
    from ckpt_stability.backends import BackendOptions
    from ckpt_stability.evaluation_job import EvaluationJob, TaskFiles

    task_files = None if args.settings else TaskFiles(
        tuple(args.task), mode=args.mode, num_fewshot=args.num_fewshot, max_samples=args.max_samples,
        few_shot_source=args.few_shot_source, add_special_tokens=not args.no_special_tokens)
    return EvaluationJob(
        model=args.model, output_dir=args.output_dir, settings=args.settings, task_files=task_files,
        backend=BackendOptions(args.backend, args.dtype, args.batch_size, args.threads),
        perplexity_text=args.perplexity_text, perplexity_output=args.perplexity_output,
        record_unusable=args.record_unusable, meta=_meta(args.meta))


def _evaluate(args: argparse.Namespace) -> None:
    from ckpt_stability.backends import may_use_vllm_on_gpu
    from ckpt_stability.engine import DEFAULT_IDLE_TIMEOUT, settings_from_environment
    from ckpt_stability.gpus import claim_gpu

    job = _evaluation_job(args)
    engine = settings_from_environment()  # the workflow's, unless given here
    idle_timeout = args.engine_idle_timeout or engine.get("idle_timeout", DEFAULT_IDLE_TIMEOUT)
    with_vllm_on_gpu = args.engine_vllm or engine.get("vllm", False)
    gpu = claim_gpu()  # before anything initialises CUDA: one GPU per job on a multi-GPU machine
    if (args.engine or engine) and (with_vllm_on_gpu or not may_use_vllm_on_gpu(args.backend)):
        from ckpt_stability.engine import evaluate_in_engine

        code = evaluate_in_engine(job, idle_timeout, Path(args.engine_log_dir), gpu)
        if code:
            raise SystemExit(code)
        return

    from ckpt_stability.backends import LoadedModel
    from ckpt_stability.evaluation_job import run_job

    loaded = LoadedModel()
    try:
        run_job(job, loaded)
    finally:
        loaded.close()


def _finetune(args: argparse.Namespace) -> None:
    from ckpt_stability.finetune import LoraSettings, Recipe, finetune_or_record
    from ckpt_stability.gpus import claim_gpu
    from ckpt_stability.prompts import PromptTemplate

    recipe = Recipe(learning_rate=args.learning_rate, batch_size=args.batch_size, seed=args.seed, steps=args.steps,
                    epochs=args.epochs,
                    lora=LoraSettings(args.lora_r, args.lora_alpha, args.lora_dropout) if args.lora_r else None)
    try:
        template = PromptTemplate(**json.loads(args.prompt)) if args.prompt else PromptTemplate()
    except (ValueError, TypeError) as error:
        raise InputError(f"--prompt: not a prompt template ({error})") from None
    claim_gpu()
    finetune_or_record(Path(args.model), Path(args.data), recipe, Path(args.output), Path(args.record),
                       record_unusable=args.record_unusable, template=template,
                       add_special_tokens=not args.no_special_tokens, threads=args.threads, meta=_meta(args.meta))


def _targets(args: argparse.Namespace) -> None:
    from ckpt_stability.targets import write_targets

    write_targets([Path(record) for record in args.records], Path(args.settings), Path(args.output))


def _engine(args: argparse.Namespace) -> None:
    from ckpt_stability.engine import Engine, stop_engines

    if args.engine_command == "serve":
        Engine(Path(args.socket), Path(args.lock), args.idle_timeout).serve()
    else:
        log.info("asked %d evaluation engine(s) to end", stop_engines())


def _indicators(args: argparse.Namespace) -> None:
    from ckpt_stability.indicators import write_indicators

    write_indicators(Path(args.plan), Path(args.scores), Path(args.perplexity_dir) if args.perplexity_dir else None,
                     Path(args.targets) if args.targets else None, Path(args.output),
                     weights_path=Path(args.weights) if args.weights else None)


def _ensemble(args: argparse.Namespace) -> None:
    from ckpt_stability.ensemble import ensemble_window

    outputs = {method.name: Path(getattr(args, f"{method.name}_dir")) for method in BUILTIN.produced_by(ENSEMBLE)
               if getattr(args, f"{method.name}_dir")}
    if not outputs:
        raise InputError(f"give {' and/or '.join(f'--{method.name}-dir' for method in BUILTIN.produced_by(ENSEMBLE))}")
    ensemble_window([Path(d) for d in args.members], args.tasks.split(","), outputs, provenance=_meta(args.meta))


def _scores(args: argparse.Namespace) -> None:
    from ckpt_stability.stability import Plan, gather_scores, write_scores

    write_scores(gather_scores(Plan.from_json(args.plan)), Path(args.output))


def _stability(args: argparse.Namespace) -> None:
    from ckpt_stability.stability import write_tables

    write_tables(Path(args.plan), Path(args.scores), Path(args.output_dir))


def _pick(args: argparse.Namespace) -> None:
    from ckpt_stability.pick import write_pick

    write_pick(Path(args.plan), Path(args.scores), Path(args.output), Path(args.checkpoints), args.range)


def _write_json(args: argparse.Namespace) -> None:
    from ckpt_stability.atomic import write_text

    try:
        data = json.loads(args.document)
    except ValueError as error:
        raise InputError(f"write-json: not a JSON document ({error})") from None
    write_text(Path(args.output), json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True) + "\n")


def _report(args: argparse.Namespace) -> None:
    from ckpt_stability.report import build_report

    build_report(plan=Path(args.plan), scores=Path(args.scores), tables=Path(args.tables),
                 settings=Path(args.settings), output=Path(args.output),
                 targets=Path(args.targets) if args.targets else None)


def _export(args: argparse.Namespace) -> None:
    from ckpt_stability.export import write_receipt
    from ckpt_stability.export.records import Results, read_tracker_runs

    runs = read_tracker_runs(Results(scores=Path(args.scores), tables=Path(args.tables), plan=Path(args.plan),
                                     perplexity=Path(args.perplexity_dir), targets=Path(args.targets),
                                     report=Path(args.report)))
    exported = args.send(runs, args)
    for entry in exported:
        log.info("%s: %d new step(s)%s", entry.name, len(entry.steps), ", tables sent" if entry.summary else "")
    if args.receipt:
        write_receipt(Path(args.receipt), args.tracker, exported)


def _to_tensorboard(runs, args: argparse.Namespace):
    from ckpt_stability.export.settings import TensorBoardSettings
    from ckpt_stability.export.tensorboard import export

    return export(runs, TensorBoardSettings(Path(args.logdir)))


def _to_wandb(runs, args: argparse.Namespace):
    from ckpt_stability.export.settings import WandbSettings
    from ckpt_stability.export.wandb import export

    return export(runs, WandbSettings(project=args.project, entity=args.entity, group=args.group, mode=args.mode,
                                      dir=Path(args.dir)))


def _to_mlflow(runs, args: argparse.Namespace):
    from ckpt_stability.export.mlflow import export
    from ckpt_stability.export.settings import MlflowSettings

    return export(runs, MlflowSettings(tracking_uri=args.tracking_uri, experiment=args.experiment))


def _export_parsers(commands) -> None:
    """`export TRACKER`: the results already computed, into a tracker, one tracker run per (run, method, window)."""
    from ckpt_stability import layout
    from ckpt_stability.export.settings import MlflowSettings, TensorBoardSettings, WandbSettings

    export = commands.add_parser("export", help="send the results to an experiment tracker, on the training step "
                                                "axis (only what it does not hold yet)")
    trackers = export.add_subparsers(dest="tracker", required=True, metavar="TRACKER")
    tensorboard = trackers.add_parser("tensorboard", help="TensorBoard event files, a directory per tracker run")
    tensorboard.add_argument("--logdir", default=str(TensorBoardSettings.logdir),
                             help="TensorBoard's log directory, e.g. the training's (default %(default)s)")
    tensorboard.set_defaults(send=_to_tensorboard)
    wandb = trackers.add_parser("wandb", help="Weights & Biases runs (offline: a directory for `wandb sync`)")
    wandb.add_argument("--project", required=True)
    wandb.add_argument("--entity", help="the team or user (default: W&B's default entity)")
    wandb.add_argument("--group", help="the runs' group (default: each training run's name)")
    wandb.add_argument("--mode", choices=["offline", "online"], default=WandbSettings.mode)
    wandb.add_argument("--dir", default=str(WandbSettings.dir),
                       help="W&B's directory: offline runs go to its wandb/ (default %(default)s)")
    wandb.set_defaults(send=_to_wandb)
    mlflow = trackers.add_parser("mlflow", help="MLflow runs in an experiment")
    mlflow.add_argument("--tracking-uri", default=MlflowSettings.tracking_uri,
                        help="a SQLite database (sqlite:///PATH) or a tracking server (default %(default)s)")
    mlflow.add_argument("--experiment", default=MlflowSettings.experiment, help="(default %(default)s)")
    mlflow.set_defaults(send=_to_mlflow)
    for tracker in (tensorboard, wandb, mlflow):
        tracker.add_argument("--plan", default=f"{layout.RESULTS}/plan.json",
                             help="the workflow's plan: its methods and their order (default %(default)s)")
        tracker.add_argument("--scores", default=layout.SCORES, help="the scores table (default %(default)s)")
        tracker.add_argument("--tables", default=layout.TABLES_DIR,
                             help="folder of stability.csv, improvement.csv and pick.csv (default %(default)s)")
        tracker.add_argument("--perplexity-dir", default=layout.PERPLEXITY_DIR,
                             help="the perplexity files, read where present (default %(default)s)")
        tracker.add_argument("--targets", default=layout.TARGETS,
                             help="the fine-tuning outcomes, read where present (default %(default)s)")
        tracker.add_argument("--report", default=layout.REPORT,
                             help="the report, sent where the tracker keeps files (default %(default)s)")
        tracker.add_argument("--receipt", help="write what the export wrote here (JSON)")
        tracker.set_defaults(handler=_export)


def _reduction_inputs(parser: argparse.ArgumentParser) -> None:
    """The inputs every reduction after `scores` reads."""
    parser.add_argument("--plan", required=True, help="the workflow's plan (results/plan.json)")
    parser.add_argument("--scores", required=True, help="the scores table written by `scores` (results/scores.parquet)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckpt-stability", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from ckpt_stability.demo import MODEL_SIZES, DemoSettings
    from ckpt_stability.engine import DEFAULT_IDLE_TIMEOUT, ENVIRONMENT
    from ckpt_stability.finetune import LoraSettings, Recipe
    from ckpt_stability.plan import PICK_RANGES
    from ckpt_stability.tasks import FEW_SHOT_SOURCES

    defaults = DemoSettings()
    demo = commands.add_parser("demo", help="the embedded demo: its data, and the pretraining of its runs")
    demo_commands = demo.add_subparsers(dest="demo_command", required=True, metavar="STEP")
    data = demo_commands.add_parser("data", help="write the demo's tasks, held-out text and tokenizer")
    data.add_argument("--output", required=True, help="writes tasks/, heldout.txt and tokenizer/ here")
    data.add_argument("--seed", type=int, default=defaults.seed)
    data.add_argument("--samples", type=int, default=defaults.samples_per_task, help="evaluation samples per task")
    data.set_defaults(handler=_demo_data)
    train = demo_commands.add_parser("train", help="pretrain one demo run, saving its checkpoints")
    train.add_argument("--data", required=True, help="the directory written by `demo data`")
    train.add_argument("--size", choices=list(MODEL_SIZES), default="base", help="the model size of the run")
    train.add_argument("--output", required=True, help="writes checkpoint-{step}/ here")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--steps", type=int, default=defaults.train_steps, help="optimizer steps")
    train.add_argument("--save-every", type=int, default=defaults.save_every, help="steps between checkpoints")
    train.add_argument("--threads", type=int, default=defaults.threads,
                       help="torch threads; fixed so that the checkpoints are bitwise reproducible")
    train.set_defaults(handler=_demo_train)

    average = commands.add_parser(
        "average", help="mean of the weights of several checkpoints, uniform or weighted (streamed, bounded memory)")
    average.add_argument("checkpoints", nargs="+", metavar="CKPT_DIR",
                         help="Hugging Face checkpoint directories, or torch.distributed checkpoint directories "
                              "with Hugging Face names (with --assets), oldest first (the last is the newest)")
    average.add_argument("--output", required=True, help="directory of the averaged checkpoint")
    average.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                         help="storage dtype of the result (default: the checkpoints' dtype)")
    average.add_argument("--max-shard-size", type=_size, default=_size("5GB"),
                         help="largest weight file; more weights are sharded with an index (default 5GB)")
    average.add_argument("--scheme", choices=SCHEMES, default=UNIFORM,
                         help="how the checkpoints are weighted (README, \"Averaging schemes\"; default uniform)")
    average.add_argument("--shape", choices=list(SHAPES), help="--scheme wsm: the decay shape")
    average.add_argument("--half-life", type=_positive, help="--scheme ema: the half-life, in steps")
    average.add_argument("--steps", nargs="+", type=_steps, metavar="STEP",
                         help="the members' steps, oldest first (space- or comma-separated): the weighted schemes' "
                              "coefficients depend on them; recorded in the provenance file")
    average.add_argument("--diagnostics", metavar="FILE",
                         help="also measure the members' relative distances to each other and to the average, "
                              "into this JSON file")
    average.add_argument("--threads", type=int, help="worker threads (default: the CPUs this process may use, "
                                                      "at most 8)")
    average.add_argument("--assets", metavar="HF_ASSETS",
                         help="the directory whose config.json and tokenizer go with the average, for checkpoints "
                              "that hold weights only (torch.distributed checkpoints); default: the newest's")
    average.add_argument("--record-unusable", action="store_true",
                         help="when a member is unusable (non-finite or broken weights), write the output "
                              "directory with only excluded.json, holding the reason, and exit 0")
    average.set_defaults(handler=_average)

    convert = commands.add_parser(
        "convert", help="a trainer's native checkpoint to a Hugging Face directory, with your converter")
    convert.add_argument("checkpoint", metavar="NATIVE_DIR", help="the checkpoint as the trainer left it")
    converter = convert.add_mutually_exclusive_group(required=True)
    converter.add_argument("--command",
                           help="the converter: a shell command with {src} (the checkpoint), {out} (the directory to "
                                "fill), {step} and {run}, each replaced by its shell-quoted value")
    converter.add_argument("--assets", metavar="HF_ASSETS",
                           help="no converter: NATIVE_DIR is a torch.distributed checkpoint with Hugging Face names, "
                                "written as safetensors beside the config.json and tokenizer of HF_ASSETS")
    convert.add_argument("--output", required=True,
                         help="the Hugging Face directory, written once the result validates; otherwise it holds "
                              "only excluded.json, with the reason and the converter's last stderr lines")
    convert.add_argument("--step", type=int, required=True, help="the checkpoint's step")
    convert.add_argument("--run", required=True, help="the run's name")
    convert.set_defaults(handler=_convert)

    evaluate = commands.add_parser("evaluate", help="few-shot evaluation of one model on llm-jp-eval tasks")
    evaluate.add_argument("--model", required=True, help="Hugging Face model directory")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", action="append", metavar="FILE", help="llm-jp-eval dataset JSON (repeatable)")
    source.add_argument("--settings", metavar="JSON",
                        help="evaluation settings (tasks with their options, prompt template, stop strings)")
    evaluate.add_argument("--output-dir", required=True, help="writes {task}.parquet here")
    evaluate.add_argument("--num-fewshot", type=int, default=4, help="with --task (default: 4)")
    evaluate.add_argument("--mode", choices=["auto", "generate", "choice"], default="auto",
                          help="with --task: scoring mode; auto = choice when the file has a label_list")
    evaluate.add_argument("--max-samples", type=int, help="with --task: evaluate the first N samples")
    evaluate.add_argument("--few-shot-source", choices=FEW_SHOT_SOURCES, default="auto",
                          help="with --task: the file's own few_shots, the samples of ../train/<file name> "
                               "(llm-jp-eval's layout), or auto: the file's when it has enough, else train")
    evaluate.add_argument("--no-special-tokens", action="store_true",
                          help="with --task: tokenize prompts without special tokens (no BOS), as llm-jp's "
                               "v1.4.1 runs do")
    evaluate.add_argument("--backend", choices=["auto", "transformers", "vllm"], default="auto")
    evaluate.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--threads", type=int, help="CPU threads for torch")
    evaluate.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                          help="extra provenance stored in the output files (repeatable); run, method: text, "
                               "window, step: integers, members: comma-separated steps, stored as a list")
    evaluate.add_argument("--perplexity-text", metavar="FILE",
                          help="also measure the model's perplexity on this held-out text (UTF-8) ...")
    evaluate.add_argument("--perplexity-output", metavar="JSON",
                          help="... and write nll, tokens, perplexity and inverse_perplexity here")
    evaluate.add_argument("--record-unusable", action="store_true",
                          help="when the model is unusable (non-finite or broken weights, does not load), write "
                               "its outputs without results, holding the reason, and exit 0")
    evaluate.add_argument("--engine", action="store_true",
                          help="evaluate in the evaluation engine of this job's slot (started when none runs), "
                               f"which keeps the model loaded for the next job; not with vLLM on a GPU unless "
                               f"--engine-vllm. Also on when the environment variable {ENVIRONMENT} holds engine "
                               f"settings, as the workflow sets it from its config key engine")
    evaluate.add_argument("--engine-vllm", action="store_true",
                          help="use the engine with the vllm backend on a GPU too (on the CPU it always may)")
    evaluate.add_argument("--engine-idle-timeout", type=_positive, metavar="SECONDS",
                          help=f"an engine started by this job ends after this long without a job "
                               f"(default {DEFAULT_IDLE_TIMEOUT:.0f})")
    evaluate.add_argument("--engine-log-dir", default="logs/engine",
                          help="where an engine started by this job writes its log (default logs/engine)")
    evaluate.set_defaults(handler=_evaluate)

    recipe = Recipe()
    finetune = commands.add_parser("finetune", help="supervised fine-tuning of one model on instruction data")
    finetune.add_argument("--model", required=True, help="Hugging Face model directory (a checkpoint or an average)")
    finetune.add_argument("--data", required=True,
                          help="instruction data: llm-jp-eval's dataset or tuning JSON, or JSONL (instruction, "
                               "input, output or prompt, completion)")
    finetune.add_argument("--output", required=True, help="directory of the fine-tuned model")
    finetune.add_argument("--record", required=True, help="JSON record: model, data and its hash, recipe, losses")
    length = finetune.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps ...")
    length.add_argument("--epochs", type=float, help="... or passes over the data (default: 1 epoch)")
    finetune.add_argument("--learning-rate", type=float, default=recipe.learning_rate)
    finetune.add_argument("--batch-size", type=int, default=recipe.batch_size, help="examples per optimizer step")
    finetune.add_argument("--seed", type=int, default=recipe.seed, help="data order and LoRA initialisation")
    finetune.add_argument("--lora-r", type=int, help="LoRA rank: fine-tune LoRA adapters (merged into the saved "
                                                     "weights) instead of every weight")
    finetune.add_argument("--lora-alpha", type=int, default=LoraSettings.alpha)
    finetune.add_argument("--lora-dropout", type=float, default=LoraSettings.dropout)
    finetune.add_argument("--prompt", metavar="JSON",
                          help='prompt template {"header": ..., "example": ...} (default: llm-jp-eval\'s)')
    finetune.add_argument("--no-special-tokens", action="store_true",
                          help="tokenize prompts without special tokens (no BOS), as evaluation does with it")
    finetune.add_argument("--threads", type=int, help="CPU threads for torch; fixed, for bitwise reproducibility")
    finetune.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                          help="provenance stored in the record (repeatable), as for evaluate")
    finetune.add_argument("--record-unusable", action="store_true",
                          help="when the model is unusable or the fine-tune diverges (non-finite loss), write the "
                               "output directory with only excluded.json and the reason in the record; exit 0")
    finetune.set_defaults(handler=_finetune)

    targets = commands.add_parser("targets", help="the fine-tuned models' scores: the indicators' target")
    targets.add_argument("records", nargs="+", metavar="RECORD",
                         help="fine-tuning records (finetune.json), each beside its model's {task}.parquet")
    targets.add_argument("--settings", required=True,
                         help="the fine-tuned models' evaluation settings (results/finetune/evaluation_settings.json)")
    targets.add_argument("--output", required=True, help="the table (CSV, and Markdown beside it)")
    targets.set_defaults(handler=_targets)

    engine = commands.add_parser("engine", help="the evaluation engines (started by `evaluate --engine`)")
    engine_commands = engine.add_subparsers(dest="engine_command", required=True, metavar="ACTION")
    serve = engine_commands.add_parser("serve", help="run an engine (what `evaluate --engine` starts)")
    serve.add_argument("--socket", required=True, help="the Unix socket to listen on")
    serve.add_argument("--lock", required=True, help="the slot's lock file, held by the job being served")
    serve.add_argument("--idle-timeout", type=_positive, required=True, metavar="SECONDS")
    engine_commands.add_parser("stop", help="end the engines serving jobs in the current directory")
    engine.set_defaults(handler=_engine)

    ensemble = commands.add_parser("ensemble", help="combine the raw predictions of a window's checkpoints")
    ensemble.add_argument("members", nargs="+", metavar="PREDICTIONS_DIR",
                          help="directories holding {task}.parquet of each checkpoint, oldest first")
    ensemble.add_argument("--tasks", required=True, help="task names, comma-separated")
    for method in BUILTIN.produced_by(ENSEMBLE):
        ensemble.add_argument(f"--{method.name}-dir", help=f"write the {method.label} ensemble here"
                                                            + " (choice tasks)" * method.choice_only)
    ensemble.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                          help="extra provenance stored in the output files (repeatable); run, method: text, "
                               "window, step: integers, members: comma-separated steps, stored as a list")
    ensemble.set_defaults(handler=_ensemble)

    scores = commands.add_parser("scores", help="gather every prediction file's score into one table")
    scores.add_argument("--plan", required=True, help="the workflow's plan (results/plan.json)")
    scores.add_argument("--output", required=True, help="the scores table (parquet)")
    scores.set_defaults(handler=_scores)

    weights = commands.add_parser("weights", help="gather the averages' weight distances into one table")
    weights.add_argument("--plan", required=True, help="the workflow's plan.json")
    weights.add_argument("--output", required=True, help="the table to write (CSV)")
    weights.set_defaults(handler=_weights)

    stability = commands.add_parser("stability", help="stability and improvement tables")
    _reduction_inputs(stability)
    stability.add_argument("--output-dir", required=True,
                           help="writes stability.csv/.md, improvement.csv/.md and excluded.csv/.md")
    stability.set_defaults(handler=_stability)

    pick = commands.add_parser("pick", help="the checkpoint to pick, its interval and the checkpoints "
                                            "indistinguishable from it")
    _reduction_inputs(pick)
    pick.add_argument("--range", choices=PICK_RANGES, default=PICK_RANGES[0],
                      help="the checkpoints compared: every step, or the final segment (default %(default)s)")
    pick.add_argument("--output", required=True, help="one row per group (CSV, and Markdown beside it)")
    pick.add_argument("--checkpoints", required=True, help="one row per checkpoint of each group (parquet)")
    pick.set_defaults(handler=_pick)

    indicators = commands.add_parser("indicators", help="how well each proxy orders models by a target")
    _reduction_inputs(indicators)
    indicators.add_argument("--perplexity-dir", help="results/perplexity, to add the 1/PPL proxies")
    indicators.add_argument("--targets", help="CSV run,step,target (default: each run's final stabilised score)")
    indicators.add_argument("--weights", help="results/tables/weights.csv, to add the weight movement proxies")
    indicators.add_argument("--output", required=True, help="the table (CSV, and Markdown beside it)")
    indicators.set_defaults(handler=_indicators)

    write_json = commands.add_parser(
        "write-json", help="write a JSON document given on the command line to a file, atomically (the "
                           "workflow's plan and evaluation settings)")
    write_json.add_argument("document", help="the JSON text")
    write_json.add_argument("--output", required=True, help="the file to write")
    write_json.set_defaults(handler=_write_json)

    report = commands.add_parser("report", help="the HTML report with its figures")
    _reduction_inputs(report)
    report.add_argument("--tables", required=True, help="folder of stability.csv, improvement.csv (indicators.csv)")
    report.add_argument("--settings", required=True, help="the evaluation settings (results/evaluation_settings.json)")
    report.add_argument("--targets", help="the fine-tuning outcomes (results/tables/targets.csv), to draw them")
    report.add_argument("--output", required=True,
                        help="the report (results/report/report.html); figures go to figures/ beside it")
    report.set_defaults(handler=_report)

    _export_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ckpt_stability.engine import LOG_DATE_FORMAT, LOG_FORMAT

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=LOG_FORMAT,
                        datefmt=LOG_DATE_FORMAT)
    try:
        args.handler(args)
    except (InputError, OSError) as error:
        code, message = reported(error)
        print(f"ckpt-stability {args.command}: error: {message}", file=sys.stderr)
        return code
    return 0
