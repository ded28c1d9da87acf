"""Checks of the workflow's configuration that its JSON schema cannot make, and what the workflow reads
of it while it is parsed (the task files, the runs' checkpoints).

YAML silently keeps the last of two equal keys, so two runs (or tasks) given the same name would
lose one of them without a word: the config files are read again here, refusing duplicate keys.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ckpt_stability.errors import InputError
from ckpt_stability.native_formats import DCP_FORMAT, HF_FORMAT

log = logging.getLogger(__name__)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise InputError(
                    f"line {key_node.start_mark.line + 1}: key {key!r} appears twice (first on line {seen[key]}); "
                    f"two entries with one name would silently become one"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def check_unique_keys(path: str | Path) -> None:
    """Refuse a YAML config file with a key given twice in one mapping (e.g. two runs of one name)."""
    try:
        with open(path, encoding="utf-8") as handle:
            yaml.load(handle, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except InputError as error:
        raise InputError(f"{path}: {error}") from None
    except yaml.YAMLError:
        pass  # not YAML (JSON, which Snakemake reads itself) or malformed: Snakemake reports that


def task_path(task: dict, task_dir: str | None) -> str:
    """A task's file: its path, read from ``task_dir`` when relative and ``task_dir`` is set."""
    return os.path.join(task_dir or "", task["path"])


def check_tasks(tasks: dict[str, dict], task_dir: str | None, written_under: str) -> None:
    """Every task file exists (all missing ones named in one error) and loads with its options; those under
    ``written_under`` are written by a rule (the demo's) and checked by the jobs that read them."""
    from ckpt_stability.tasks import TASK_OPTIONS, load_task

    paths = {name: task_path(task, task_dir) for name, task in tasks.items()}
    missing = [f"{name}: {path}" for name, path in paths.items()
               if not os.path.exists(path) and not path.startswith(written_under)]
    if missing:
        raise InputError(f"{len(missing)} task file(s) missing:\n  " + "\n  ".join(missing))
    for name, task in tasks.items():
        if os.path.exists(paths[name]):
            load_task(paths[name], name=name, **{key: task[key] for key in TASK_OPTIONS})


@dataclass(frozen=True)
class RunSource:
    """Where a run's checkpoints are, as the config gives them: a path pattern with ``{step}``; their format,
    by which completeness is judged (``native_formats``); and the command that converts each one to a Hugging
    Face directory (``conversion``), if any."""

    pattern: str
    format: str = HF_FORMAT
    convert: str | None = None
    hf_assets: str | None = None
    """for format dcp without a converter: the directory of config.json and the tokenizer (``dcp_checkpoints``)"""

    @classmethod
    def from_config(cls, name: str, entry: str | dict) -> "RunSource":
        """A run of the config: its short form (the pattern) or its mapping (path, format, convert, hf_assets)."""
        if isinstance(entry, str):
            return cls(entry)
        source = cls(entry["path"], entry.get("format", HF_FORMAT), entry.get("convert"), entry.get("hf_assets"))
        if source.hf_assets is not None:
            if source.format != DCP_FORMAT or source.convert is not None:
                raise InputError(f"config runs.{name}.hf_assets: for format {DCP_FORMAT} without a convert command "
                                 f"(checkpoints with Hugging Face names, read in place); this run has format "
                                 f"{source.format}" + (" and a convert command" if source.convert else ""))
            from ckpt_stability.checkpoints import assets_problem

            problem = assets_problem(Path(source.hf_assets))
            if problem is not None:
                raise InputError(f"config runs.{name}.hf_assets: {source.hf_assets}: {problem}")
        elif source.format != HF_FORMAT and source.convert is None:
            raise InputError(f"config runs.{name}: format {source.format} needs a convert command that turns each "
                             f"checkpoint into a Hugging Face directory"
                             + (" (or hf_assets, for checkpoints with Hugging Face names)"
                                if source.format == DCP_FORMAT else ""))
        if source.convert is not None:
            from ckpt_stability.conversion import converter_problem

            problem = converter_problem(source.convert)
            if problem is not None:
                raise InputError(f"config runs.{name}.convert: {source.convert!r}: {problem}")
        return source


def _check_names_in_place(name: str, run) -> None:
    """A run read in place must hold its model's tensors under their Hugging Face names: checked once, when the
    workflow starts, on the newest checkpoint whose .metadata reads (a broken one is left to its jobs)."""
    from ckpt_stability.conversion import tensor_names_problem
    from ckpt_stability.dcp_checkpoints import dcp_tensor_names
    from ckpt_stability.errors import UnusableCheckpoint

    for step in reversed(run.steps):
        try:
            names = dcp_tensor_names(run.paths[step])
        except UnusableCheckpoint:
            continue
        problem = tensor_names_problem(names, run.hf_assets)
        if problem is not None:
            raise InputError(f"config runs.{name}.hf_assets: {run.paths[step]}: {problem} (of {run.hf_assets}); a "
                             f"checkpoint whose names are not Hugging Face's takes a convert command")
        return


def plan_runs(runs: dict[str, str | dict], largest_window: int, produced_steps: dict[str, list[int]]) -> dict:
    """name -> ``checkpoints.Run`` of every configured run (``produced_steps``: the steps a rule of the
    workflow writes, by run pattern); incomplete and unsupported checkpoints are left out with a warning."""
    from ckpt_stability.checkpoints import plan_run

    planned = {}
    for name, entry in runs.items():
        source = RunSource.from_config(name, entry)
        try:
            planned[name] = plan_run(name, source.pattern, largest_window, produced_steps.get(source.pattern, []),
                                     native_format=source.format, convert=source.convert,
                                     hf_assets=Path(source.hf_assets) if source.hf_assets else None)
        except InputError as error:
            raise InputError(f"config runs.{name}: {error}") from None
        if source.hf_assets is not None:
            _check_names_in_place(name, planned[name])
        for directory, reason in planned[name].incomplete.items():
            log.warning("run %s: skipping incomplete checkpoint %s (%s); it is picked up once complete, by the next "
                        "invocation", name, directory, reason)
        for directory, reason in planned[name].unsupported.items():
            log.warning("run %s: skipping checkpoint %s: %s; it is not evaluated until its weights are saved in a "
                        "supported layout", name, directory, reason)
    return planned


def select_checkpoints(steps: list[int], selection: dict) -> list[int]:
    """The steps of ``steps`` that a fine-tuning selection names: ``every`` (steps that are multiples of it),
    ``last`` (the last N checkpoints) and ``steps`` (a list), together. A listed step that the run does not
    have (yet) is left out."""
    chosen = {step for step in steps if selection.get("every") and step % selection["every"] == 0}
    chosen.update(steps[-selection["last"]:] if selection.get("last") else [])
    chosen.update(step for step in selection.get("steps", []) if step in steps)
    return sorted(chosen)


def plan_finetuning(run_steps: dict[str, list[int]], finetune: dict) -> dict[str, list[int]]:
    """run -> the steps whose checkpoints are fine-tuned (config key finetune: ``select``, or a run's own
    ``select_by_run``). A listed step a run lacks is a warning (it is picked up once saved); a selection that
    names no checkpoint at all is an error."""
    by_run = finetune.get("select_by_run", {})
    unknown = sorted(set(by_run) - set(run_steps))
    if unknown:
        raise InputError(f"config finetune.select_by_run: no run named {', '.join(unknown)} (runs: "
                         f"{', '.join(run_steps)})")
    selected = {}
    for run, steps in run_steps.items():
        selection = by_run.get(run, finetune["select"])
        missing = [step for step in selection.get("steps", []) if step not in steps]
        if missing:
            log.warning("finetune: run %s has no checkpoint at step(s) %s: not fine-tuned until saved", run,
                        ", ".join(map(str, missing)))
        selected[run] = select_checkpoints(steps, selection)
    if not any(selected.values()):
        ranges = "; ".join(f"{run} {steps[0]}-{steps[-1]}" for run, steps in run_steps.items())
        raise InputError(f"config finetune.select: names no existing checkpoint of any run (their steps: {ranges})")
    return selected
