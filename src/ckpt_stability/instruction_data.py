"""Instruction data for supervised fine-tuning: prompt and completion pairs, read from the formats teams have.

* **llm-jp-eval's dataset JSON** (the evaluation format, ``{"instruction": ..., "samples": [{"input",
  "output"}, ...]}``), e.g. a task's ``train/`` split: one example per sample.
* **llm-jp-eval's tuning JSON** (``tuning/train/{task}.json``: a list of ``{"ID", "instruction", "input",
  "output", "text"}``) or **JSONL** with ``instruction`` (optional ``input``) and ``output`` per line.
* **JSONL** with ``prompt`` and ``completion`` per line, used as they are.

Examples given as instruction and input are rendered with the workflow's prompt template and no few-shot
example (``PromptTemplate.render``), so that a model is fine-tuned on exactly the prompts it is then
evaluated on with ``num_fewshot: 0``. (llm-jp-eval's tuning ``text`` leaves out the input heading when an
input is empty; it is not read, the template renders every example the same way.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt_stability.errors import InputError
from ckpt_stability.prompts import PromptTemplate


@dataclass(frozen=True)
class InstructionData:
    """The examples of one file, with the file's SHA-256 for the fine-tuning record."""

    path: Path
    examples: tuple[InstructionExample, ...]
    sha256: str


@dataclass(frozen=True)
class InstructionExample:
    """One example: the loss is on the completion, which follows the prompt."""

    prompt: str
    completion: str


def read_instruction_data(path: str | Path, template: PromptTemplate = PromptTemplate()) -> InstructionData:
    """The examples of ``path`` (any of the module's formats); every problem is an InputError naming the file
    and, where it applies, the line or sample."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read the fine-tuning data ({error})") from None
    if path.suffix == ".jsonl":
        records = [(f"line {number}", _json(path, line, f"line {number}"))
                   for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        examples = [_example(path, where, record, template) for where, record in records]
    else:
        document = _json(path, text, "the file")
        if isinstance(document, dict) and "samples" in document:  # llm-jp-eval's dataset format
            instruction = document.get("instruction")
            if not isinstance(instruction, str):
                raise InputError(f"{path}: instruction must be a string (llm-jp-eval dataset format)")
            if not isinstance(document["samples"], list):
                raise InputError(f"{path}: samples must be a list (llm-jp-eval dataset format)")
            examples = [_example(path, f"sample {number}", {"instruction": instruction, **_mapping(path, sample,
                                 f"sample {number}")}, template) for number, sample in enumerate(document["samples"])]
        elif isinstance(document, list):  # llm-jp-eval's tuning format
            examples = [_example(path, f"item {number}", record, template) for number, record in enumerate(document)]
        else:
            raise InputError(f"{path}: neither llm-jp-eval's dataset format (an object with samples) nor its tuning "
                             f"format (a list of instruction, input, output), nor JSONL (a .jsonl file)")
    if not examples:
        raise InputError(f"{path}: no fine-tuning examples")
    return InstructionData(path, tuple(examples), hashlib.sha256(raw).hexdigest())


def _json(path: Path, text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise InputError(f"{path}: {where} is not valid JSON ({error})") from None


def _mapping(path: Path, record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise InputError(f"{path}: {where} is not a JSON object")
    return record


def _example(path: Path, where: str, record: Any, template: PromptTemplate) -> InstructionExample:
    record = _mapping(path, record, where)
    if "prompt" in record or "completion" in record:
        fields = ("prompt", "completion")
    else:
        fields = ("instruction", "output")
    missing = [key for key in fields if not isinstance(record.get(key), str)]
    if missing or not isinstance(record.get("input", ""), str):
        raise InputError(f"{path}: {where} needs string fields {' and '.join(fields)} (and optionally input); "
                         f"{', '.join(missing) or 'input'} is missing or not a string")
    if fields[0] == "prompt":
        prompt, completion = record["prompt"], record["completion"]
    else:
        prompt, completion = template.render(record["instruction"], [], record.get("input", "")), record["output"]
    if not completion:
        raise InputError(f"{path}: {where} has an empty {fields[1]}: nothing to learn")
    return InstructionExample(prompt, completion)
