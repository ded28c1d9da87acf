"""The settings section: what produced the results (tasks and their files' hashes, prompts, backends,
library versions), and the warnings when checkpoints of one run disagree on them."""

from __future__ import annotations

import dataclasses
import json
import platform
from importlib import metadata

from ckpt_stability import __version__
from ckpt_stability.plan import Plan
from ckpt_stability.report.inputs import RawTask

REPORT_PACKAGES = ["numpy", "pandas", "pyarrow", "matplotlib", "seaborn", "jinja2"]


def _distinct(values) -> list:
    seen = {}
    for value in values:
        seen.setdefault(json.dumps(value, sort_keys=True, ensure_ascii=False), value)
    return list(seen.values())


def settings_section(plan: Plan, settings: dict, raw: dict[str, dict[str, RawTask]]) -> tuple[dict, list[str]]:
    """The settings that produced the results, from the prediction files' provenance; a task file or prompt
    hash that differs between checkpoints is reported as a warning."""
    warnings = []
    provenances = {task: [p for run in raw for p in raw[run][task].provenance] for task in plan.tasks}
    tasks = []
    for task, records in provenances.items():
        configured = settings.get("tasks", {}).get(task, {})
        hashes = {key: _distinct(get(p) for p in records) for key, get in {
            "task_sha256": lambda p: p.get("task", {}).get("sha256"),
            "prompts_sha256": lambda p: p.get("prompt", {}).get("prompts_sha256"),
            "template_sha256": lambda p: p.get("prompt", {}).get("template_sha256"),
        }.items()}
        for key, values in hashes.items():
            if len(values) > 1:
                warnings.append(f"task {task}: the raw predictions carry {len(values)} different {key} values")
        last = records[-1]
        tasks.append({"name": task, "category": plan.tasks[task].category, "mode": plan.tasks[task].mode,
                      "metric": last.get("task", {}).get("metric"),
                      "num_fewshot": last.get("prompt", {}).get("num_fewshot", configured.get("num_fewshot")),
                      "max_samples": configured.get("max_samples"),
                      "examples": len(raw[next(iter(raw))][task].example_ids),
                      "path": configured.get("path", last.get("task", {}).get("path")), **hashes})
    records = [p for run in raw for task in raw[run] for p in raw[run][task].provenance]
    runs = []
    for run, steps in plan.runs.items():
        first_task = next(iter(plan.tasks))
        runs.append({"name": run, "checkpoints": len(steps), "first_step": steps[0], "last_step": steps[-1],
                     "segment": plan.segment(run),
                     "first_model": raw[run][first_task].provenance[0].get("model_path"),
                     "last_model": raw[run][first_task].provenance[-1].get("model_path")})
    report_versions = {"ckpt_stability": __version__, "python": platform.python_version()}
    report_versions.update({name: metadata.version(name) for name in REPORT_PACKAGES})
    return {
        "runs": runs,
        "windows": plan.windows,
        "methods": plan.methods,
        "final_fraction": plan.final_fraction,
        "tasks": tasks,
        "templates": _distinct(p.get("prompt", {}).get("template") for p in records),
        "stop": _distinct(p.get("prompt", {}).get("stop") for p in records),
        "inference": _distinct({"backend": p.get("backend"), "versions": p.get("versions")} for p in records),
        "report_versions": report_versions,
        "plan_json": json.dumps(dataclasses.asdict(plan), indent=1, ensure_ascii=False),
        "settings_json": json.dumps(settings, indent=1, ensure_ascii=False, sort_keys=True),
    }, warnings
