"""Evaluation tasks in llm-jp-eval's dataset JSON (v1)::

    {"instruction": str, "output_length": int, "metrics": [str, ...],
     "samples":   [{"input": str, "output": str}, ...],
     "few_shots": [{"input": str, "output": str}, ...],   # optional, often empty
     "label_list": [str, ...]}                            # optional: the closed set of answers

llm-jp-eval (v1.3 and later) leaves ``few_shots`` of its evaluation files empty and takes the first
``num_fewshot`` samples of ``../train/<same file name>`` instead; ``few_shot_source`` chooses between the
two. Metrics this project does not compute (``comet_wmt22``, ``bert_score_ja_f1``, ...) are skipped with a
warning. Every problem is an InputError that names the file and, where it applies, the sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_stability.errors import InputError
from ckpt_stability.metrics import METRICS
from ckpt_stability.prompts import PromptTemplate

log = logging.getLogger(__name__)

MODES = ("generate", "choice")
FEW_SHOT_SOURCES = ("auto", "file", "train")
TASK_OPTIONS = ("category", "mode", "num_fewshot", "max_samples", "few_shot_source")
"""a task's settings beside its path, the keyword arguments of ``load_task``"""
# The folders of llm-jp-eval's evaluation files that have a train/ sibling holding their few-shot pool.
EVALUATION_SPLITS = ("dev", "test")


@dataclass(frozen=True)
class Example:
    input: str
    output: str


@dataclass(frozen=True)
class Task:
    name: str
    path: Path
    category: str
    mode: str
    num_fewshot: int
    instruction: str
    output_length: int
    metrics: tuple[str, ...]  # as the file lists them, those computed elsewhere only included
    label_list: tuple[str, ...] | None
    few_shots: tuple[Example, ...]  # the num_fewshot examples every prompt shows
    few_shot_path: Path  # where they come from: the task file or its ../train/ sibling
    samples: tuple[Example, ...]
    sha256: str

    @property
    def metric(self) -> str:
        """The task score is the mean of the first of its metrics that this project computes."""
        return next(metric for metric in self.metrics if metric in METRICS)

    def prompts(self, template: PromptTemplate) -> list[str]:
        context = template.context(self.instruction, [(shot.input, shot.output) for shot in self.few_shots])
        return [context + template.query(sample.input) for sample in self.samples]


def load_task(
    path: str | Path,
    *,
    name: str | None = None,
    category: str = "",
    mode: str = "auto",
    num_fewshot: int = 4,
    max_samples: int | None = None,
    few_shot_source: str = "auto",
) -> Task:
    """Read and check a task file. ``few_shot_source``: ``file`` takes the file's own few_shots,
    ``train`` the samples of ``../train/<file name>``, ``auto`` the file's few_shots when it has
    ``num_fewshot`` of them, else the train file beside a ``dev/`` or ``test/`` folder."""
    path = Path(path)
    name = name or path.stem
    if mode not in (*MODES, "auto"):
        raise InputError(f"{path}: scoring mode {mode!r} is not one of {', '.join(MODES)} (or auto)")
    if few_shot_source not in FEW_SHOT_SOURCES:
        raise InputError(f"{path}: few_shot_source {few_shot_source!r} is not one of {', '.join(FEW_SHOT_SOURCES)}")
    raw_bytes, data = _read_json(path)
    missing = [key for key in ("instruction", "output_length", "metrics", "samples") if key not in data]
    if missing:
        raise InputError(f"{path}: missing key(s) {', '.join(missing)} (llm-jp-eval dataset format)")
    if not isinstance(data["instruction"], str):
        raise InputError(f"{path}: instruction must be a string")
    output_length = data["output_length"]
    if not isinstance(output_length, int) or isinstance(output_length, bool) or output_length < 1:
        raise InputError(f"{path}: output_length must be a positive integer, got {output_length!r}")
    metrics = _metrics(path, data["metrics"])
    own_few_shots = _examples(path, data.get("few_shots", []), "few_shots")
    samples = _examples(path, data["samples"], "samples")
    if not samples:
        raise InputError(f"{path}: samples is empty")
    label_list = _label_list(path, data.get("label_list"))
    if mode == "auto":
        mode = "choice" if label_list else "generate"
    if label_list is None and mode == "choice":
        raise InputError(f"{path}: scoring mode 'choice' needs a label_list in the task file")
    if label_list is not None:
        _check_labels(path, "few_shots", own_few_shots, label_list)
        _check_labels(path, "samples", samples, label_list)
    few_shots, few_shot_path = _few_shots(path, own_few_shots, num_fewshot, few_shot_source)
    if label_list is not None and few_shot_path != path:
        _check_labels(few_shot_path, "samples", few_shots, label_list)
    if max_samples is not None:
        samples = samples[:max_samples]
    return Task(
        name=name,
        path=path,
        category=category,
        mode=mode,
        num_fewshot=num_fewshot,
        instruction=data["instruction"],
        output_length=output_length,
        metrics=metrics,
        label_list=label_list,
        few_shots=few_shots,
        few_shot_path=few_shot_path,
        samples=samples,
        sha256=hashlib.sha256(raw_bytes).hexdigest(),
    )


def _read_json(path: Path) -> tuple[bytes, dict[str, Any]]:
    try:
        raw_bytes = path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: cannot read task file ({error.strerror})") from None
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 (invalid byte at offset {error.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object with instruction, output_length, metrics, samples")
    return raw_bytes, data


def _metrics(path: Path, metrics: Any) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, list) or not metrics or not all(isinstance(metric, str) for metric in metrics):
        raise InputError(f"{path}: metrics must be a non-empty list of metric names")
    skipped = [metric for metric in metrics if metric not in METRICS]
    if len(skipped) == len(metrics):
        raise InputError(f"{path}: unknown metric(s) {', '.join(skipped)}; supported: {', '.join(METRICS)}")
    if skipped:
        scored_by = next(metric for metric in metrics if metric in METRICS)
        log.warning("%s: skipping metric(s) %s, not computed here; the task is scored by %s",
                    path, ", ".join(skipped), scored_by)
    return tuple(metrics)


def _label_list(path: Path, label_list: Any) -> tuple[str, ...] | None:
    if label_list is None:
        return None
    if not isinstance(label_list, list) or not label_list or not all(isinstance(label, str) for label in label_list):
        raise InputError(f"{path}: label_list must be a non-empty list of strings")
    if len(set(label_list)) != len(label_list):
        raise InputError(f"{path}: label_list has duplicates")
    return tuple(label_list)


def _check_labels(path: Path, key: str, examples: tuple[Example, ...], label_list: tuple[str, ...]) -> None:
    for index, example in enumerate(examples):
        if example.output not in label_list:
            raise InputError(
                f"{path}: {key}[{index}] has output {example.output!r}, which is not in label_list {list(label_list)}"
            )


def _few_shots(path: Path, own: tuple[Example, ...], num_fewshot: int, source: str) -> tuple[tuple[Example, ...], Path]:
    """The examples every prompt shows and the file they come from: the task file's few_shots, or the
    first num_fewshot samples, in file order, of the ../train/ sibling that llm-jp-eval takes them from."""
    shortage = f"num_fewshot is {num_fewshot} but the file has only {len(own)} few_shots"
    if source == "file" or (source == "auto" and len(own) >= num_fewshot):
        if len(own) < num_fewshot:
            raise InputError(f"{path}: {shortage}")
        return own[:num_fewshot], path
    real = path.resolve()  # llm-jp-eval looks beside the file a symbolic link points to
    train = real.parent.parent / "train" / real.name
    if source == "auto" and real.parent.name not in EVALUATION_SPLITS:
        raise InputError(f"{path}: {shortage}, and outside a dev/ or test/ folder no ../train/{real.name} is used")
    prefix = f"num_fewshot is {num_fewshot} but" if source == "train" else f"{shortage} and"
    if not train.is_file():
        raise InputError(f"{path}: {prefix} {train} does not exist")
    _, data = _read_json(train)
    items = data.get("samples")
    if not isinstance(items, list):
        raise InputError(f"{train}: samples must be a list of {{\"input\", \"output\"}} objects")
    if len(items) < num_fewshot:
        raise InputError(f"{path}: {prefix} {train} has only {len(items)} samples")
    return _examples(train, items[:num_fewshot], "samples"), train


def _examples(path: Path, items: Any, key: str) -> tuple[Example, ...]:
    if not isinstance(items, list):
        raise InputError(f"{path}: {key} must be a list of {{\"input\", \"output\"}} objects")
    examples = []
    for index, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get("input"), str) and isinstance(item.get("output"), str)):
            raise InputError(f"{path}: {key}[{index}] must be an object with string fields input and output")
        examples.append(Example(item["input"], item["output"]))
    return tuple(examples)
