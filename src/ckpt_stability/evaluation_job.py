"""One evaluation job: a model, its tasks and where the results go, as a typed record, and how it runs.

The record is what ``ckpt-stability evaluate`` is asked to do; it travels as JSON to the evaluation
engine (``engine``), which runs it on its loaded model, or runs in the command's own process. Either way
``run_job`` does the same: check the model, load it (or swap its weights in), evaluate every task,
measure the perplexity, or record the model as unusable. This module imports nothing heavy, so that a job
handed to an engine costs no torch import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_stability.backends import BackendOptions, LoadedModel


@dataclass(frozen=True)
class TaskFiles:
    """Tasks given as files with shared options (``evaluate --task``), instead of a settings file."""

    paths: tuple[str, ...]
    mode: str = "auto"
    num_fewshot: int = 4
    max_samples: int | None = None
    few_shot_source: str = "auto"
    add_special_tokens: bool = True


@dataclass(frozen=True)
class EvaluationJob:
    model: str
    output_dir: str
    settings: str | None = None
    """the evaluation settings file (the workflow's results/evaluation_settings.json) ..."""
    task_files: TaskFiles | None = None
    """... or task files with their options"""
    backend: BackendOptions = field(default_factory=BackendOptions)
    perplexity_text: str | None = None
    perplexity_output: str | None = None
    record_unusable: bool = False
    """record an unusable model (see ``outcomes``) as its outputs, instead of failing"""
    meta: dict = field(default_factory=dict)
    """provenance stored in the outputs (run, method, window, step, members)"""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "EvaluationJob":
        task_files = data.get("task_files")
        return cls(**{**data, "backend": BackendOptions(**data["backend"]),
                      "task_files": TaskFiles(**{**task_files, "paths": tuple(task_files["paths"])})
                      if task_files else None})


def load_settings(job: EvaluationJob):
    from ckpt_stability.evaluate import EvaluationSettings
    from ckpt_stability.tasks import load_task

    if job.settings:
        return EvaluationSettings.from_json(job.settings)
    options = job.task_files
    return EvaluationSettings([load_task(path, mode=options.mode, num_fewshot=options.num_fewshot,
                                         max_samples=options.max_samples, few_shot_source=options.few_shot_source)
                               for path in options.paths], add_special_tokens=options.add_special_tokens)


def run_job(job: EvaluationJob, loaded: LoadedModel) -> None:
    """Evaluate ``job.model`` on ``loaded``'s backend (loaded, reused or swapped as ``LoadedModel.load``
    decides): every task's predictions and, when asked, the perplexity; an unusable model is recorded as
    such under ``record_unusable`` and raises UnusableCheckpoint otherwise."""
    from ckpt_stability.errors import InputError, UnusableCheckpoint
    from ckpt_stability.evaluate import evaluate_model, measure_perplexity, record_excluded
    from ckpt_stability.outcomes import check_usable, loading_failure

    settings = load_settings(job)
    if bool(job.perplexity_text) != bool(job.perplexity_output):
        raise InputError("--perplexity-text and --perplexity-output go together")
    model = Path(job.model)
    try:
        check_usable(model)
        options = dataclasses.replace(job.backend, add_special_tokens=settings.add_special_tokens)
        try:
            backend = loaded.load(job.model, options)
        except (InputError, KeyboardInterrupt):
            raise
        except Exception as error:
            raise loading_failure(error, model) or error
    except UnusableCheckpoint as error:
        if not job.record_unusable:
            raise
        record_excluded(model, str(error), settings, job.output_dir,
                        Path(job.perplexity_output) if job.perplexity_output else None, job.meta)
        return
    evaluate_model(backend, job.model, settings, job.output_dir, provenance=job.meta)
    if job.perplexity_text:
        measure_perplexity(backend, job.model, Path(job.perplexity_text), Path(job.perplexity_output),
                           provenance=job.meta)
