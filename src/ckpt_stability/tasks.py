"""Evaluation tasks in llm-jp-eval's dataset JSON (v1)::

    {"instruction": str, "output_length": int, "metrics": [str, ...],
     "few_shots": [{"input": str, "output": str}, ...],
     "samples":   [{"input": str, "output": str}, ...],
     "label_list": [str, ...]}            # optional: the closed set of answers

Every problem is an InputError that names the file and, where it applies, the sample.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ckpt_stability.errors import InputError
from ckpt_stability.metrics import METRICS
from ckpt_stability.prompts import PromptTemplate

MODES = ("generate", "choice")


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
    metrics: tuple[str, ...]
    label_list: tuple[str, ...] | None
    few_shots: tuple[Example, ...]
    samples: tuple[Example, ...]
    sha256: str

    @property
    def metric(self) -> str:
        """The task score is the mean of its first metric."""
        return self.metrics[0]

    def prompts(self, template: PromptTemplate) -> list[str]:
        context = template.context(
            self.instruction, [(shot.input, shot.output) for shot in self.few_shots[: self.num_fewshot]]
        )
        return [context + template.query(sample.input) for sample in self.samples]


def load_task(
    path: str | Path,
    *,
    name: str | None = None,
    category: str = "",
    mode: str = "auto",
    num_fewshot: int = 0,
    max_samples: int | None = None,
) -> Task:
    path = Path(path)
    name = name or path.stem
    if mode not in (*MODES, "auto"):
        raise InputError(f"{path}: scoring mode {mode!r} is not one of {', '.join(MODES)} (or auto)")
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
        raise InputError(f"{path}: expected a JSON object with instruction, output_length, metrics, few_shots, samples")
    missing = [key for key in ("instruction", "output_length", "metrics", "few_shots", "samples") if key not in data]
    if missing:
        raise InputError(f"{path}: missing key(s) {', '.join(missing)} (llm-jp-eval dataset format)")
    if not isinstance(data["instruction"], str):
        raise InputError(f"{path}: instruction must be a string")
    output_length = data["output_length"]
    if not isinstance(output_length, int) or isinstance(output_length, bool) or output_length < 1:
        raise InputError(f"{path}: output_length must be a positive integer, got {output_length!r}")
    metrics = data["metrics"]
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, list) or not metrics:
        raise InputError(f"{path}: metrics must be a non-empty list of metric names")
    unknown = [metric for metric in metrics if metric not in METRICS]
    if unknown:
        raise InputError(f"{path}: unknown metric(s) {', '.join(map(str, unknown))}; supported: {', '.join(METRICS)}")
    few_shots = _examples(path, data["few_shots"], "few_shots")
    samples = _examples(path, data["samples"], "samples")
    if not samples:
        raise InputError(f"{path}: samples is empty")
    if num_fewshot > len(few_shots):
        raise InputError(f"{path}: num_fewshot is {num_fewshot} but the file has only {len(few_shots)} few_shots")
    label_list = data.get("label_list")
    if mode == "auto":
        mode = "choice" if label_list else "generate"
    if label_list is not None:
        if not isinstance(label_list, list) or not label_list or not all(isinstance(label, str) for label in label_list):
            raise InputError(f"{path}: label_list must be a non-empty list of strings")
        if len(set(label_list)) != len(label_list):
            raise InputError(f"{path}: label_list has duplicates")
        labels = set(label_list)
        for key, examples in (("few_shots", few_shots), ("samples", samples)):
            for index, example in enumerate(examples):
                if example.output not in labels:
                    raise InputError(
                        f"{path}: {key}[{index}] has output {example.output!r}, which is not in label_list "
                        f"{label_list}"
                    )
        label_list = tuple(label_list)
    elif mode == "choice":
        raise InputError(f"{path}: scoring mode 'choice' needs a label_list in the task file")
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
        metrics=tuple(metrics),
        label_list=label_list,
        few_shots=few_shots,
        samples=samples,
        sha256=hashlib.sha256(raw_bytes).hexdigest(),
    )


def _examples(path: Path, items, key: str) -> tuple[Example, ...]:
    if not isinstance(items, list):
        raise InputError(f"{path}: {key} must be a list of {{\"input\", \"output\"}} objects")
    examples = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("input"), str) or not isinstance(item.get("output"), str):
            raise InputError(f"{path}: {key}[{index}] must be an object with string fields input and output")
        examples.append(Example(item["input"], item["output"]))
    return tuple(examples)
