"""Checkpoints: discovery from a run's path pattern, completeness, and safetensors headers.

A run is described by a path pattern with one ``{step}`` placeholder, e.g.
``/data/run1/checkpoint-{step}``. Discovery lists the directories matching it, takes the integer in
place of ``{step}`` as the step and orders them numerically. A directory counts only once it is
complete, so that a checkpoint still being copied is never evaluated half-written.

Nothing here imports torch: the workflow calls it while parsing the DAG.
"""

from __future__ import annotations

import glob
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ckpt_stability.errors import InputError

STEP = "{step}"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Discovery:
    """The checkpoints found for one run pattern."""

    complete: dict[int, Path]
    """step -> checkpoint directory, in increasing step order"""
    incomplete: dict[Path, str]
    """directory -> why it does not count (yet)"""


def validate_pattern(pattern: str) -> None:
    if pattern.count(STEP) != 1:
        raise InputError(
            f"run pattern {pattern!r} must contain the placeholder {STEP} exactly once "
            f"(e.g. /data/run1/checkpoint-{STEP})"
        )


def checkpoint_path(pattern: str, step: int) -> Path:
    """The directory of ``step`` for a pattern (for checkpoints not on disk yet)."""
    return Path(pattern.replace(STEP, str(step)))


def discover(pattern: str) -> Discovery:
    """Find the checkpoints of one run; see the module docstring."""
    validate_pattern(pattern)
    prefix, suffix = pattern.split(STEP)
    matcher = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + r"/?")
    found: dict[int, Path] = {}
    incomplete: dict[Path, str] = {}
    for candidate in glob.glob(glob.escape(prefix) + "*" + glob.escape(suffix)):
        match = matcher.fullmatch(candidate)
        if match is None or not Path(candidate).is_dir():
            continue
        step = int(match.group(1))
        path = Path(candidate)
        if step in found:
            raise InputError(
                f"run pattern {pattern!r}: step {step} matches two directories, "
                f"{found[step]} and {path}"
            )
        reason = incomplete_reason(path)
        if reason is None:
            found[step] = path
        else:
            incomplete[path] = reason
    return Discovery(dict(sorted(found.items())), incomplete)


def incomplete_reason(directory: Path) -> str | None:
    """Why ``directory`` is not (yet) a complete checkpoint, or None when it is."""
    if not (directory / "config.json").is_file():
        return "config.json is missing"
    try:
        read_config(directory)
    except InputError as error:
        return str(error).removeprefix(f"{directory / 'config.json'}: ")
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{INDEX_FILE} is not a valid index (no weight_map); it may still be being written"
        for name in weight_files:
            reason = _weight_file_problem(directory / name)
            if reason is not None:
                return f"{name} (named by {INDEX_FILE}) {reason}"
        return None
    if not (directory / SINGLE_FILE).exists():
        return f"neither {SINGLE_FILE} nor {INDEX_FILE} is present"
    reason = _weight_file_problem(directory / SINGLE_FILE)
    return None if reason is None else f"{SINGLE_FILE} {reason}"


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: config.json is not UTF-8 text") from None
    except ValueError as error:
        raise InputError(f"{path}: config.json is not valid JSON ({error})") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read config.json ({error.strerror})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: config.json is not a JSON object")
    return config


NON_ARCHITECTURE_KEYS = frozenset({"_name_or_path", "name_or_path", "transformers_version", "_commit_hash"})
"""config.json keys that name or date a checkpoint without changing the model"""


def architecture(config: dict) -> dict:
    """What must be equal between checkpoints of one run: their config minus names and versions."""
    return {key: value for key, value in config.items() if key not in NON_ARCHITECTURE_KEYS}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")


def check_model_dir(directory: str | Path) -> None:
    """Everything inference needs, checked before loading, so that a broken checkpoint is an error that
    names the file and the problem rather than a traceback from deep inside a library."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory")
    read_config(directory)
    read_checkpoint_headers(directory)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{directory}: no tokenizer (none of {', '.join(TOKENIZER_FILES)})")


def _weight_file_problem(path: Path) -> str | None:
    if not path.is_file():
        return "is missing"
    if path.stat().st_size == 0:
        return "is empty"
    try:
        read_header(path)
    except InputError as error:
        return "is unreadable: " + str(error).removeprefix(f"{path}: ")
    return None


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    """absolute byte offset of the tensor's data in the file"""
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse a safetensors header and check that the file holds every byte it announces.

    A file shorter than its header says is truncated (or still being copied): an InputError names it.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InputError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise InputError(
                f"{path}: truncated safetensors file (header of {header_len} bytes announced, "
                f"file has {size} bytes)"
            )
        try:
            raw = json.loads(handle.read(header_len))
        except ValueError as error:
            raise InputError(f"{path}: safetensors header is not valid JSON ({error})") from None
    data_start = 8 + header_len
    metadata = raw.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in raw.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: safetensors header entry for tensor {name!r} is malformed") from None
        count = 1
        for dim in shape:
            count *= dim
        if dtype in DTYPE_SIZES and end - begin != count * DTYPE_SIZES[dtype]:
            raise InputError(
                f"{path}: tensor {name!r} has {end - begin} bytes, its dtype {dtype} and shape "
                f"{list(shape)} need {count * DTYPE_SIZES[dtype]}"
            )
        tensors[name] = TensorEntry(name, dtype, shape, data_start + begin, data_start + end)
    if tensors:
        last = max(tensors.values(), key=lambda entry: entry.end)
        if last.end > size:
            raise InputError(
                f"{path}: truncated safetensors file ({size} bytes; tensor {last.name!r} ends at byte "
                f"{last.end})"
            )
    return SafetensorsHeader(path, tensors, metadata)


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a complete checkpoint, in index order; an InputError names what is wrong."""
    directory = Path(directory)
    reason = incomplete_reason(directory)
    if reason is not None:
        raise InputError(f"{directory}: not a complete checkpoint: {reason}")
    index = directory / INDEX_FILE
    if index.is_file():
        names = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        return [directory / name for name in dict.fromkeys(names)]
    return [directory / SINGLE_FILE]


def read_checkpoint_headers(directory: str | Path) -> dict[str, tuple[SafetensorsHeader, TensorEntry]]:
    """tensor name -> (its file's header, its entry), over all shards; checks the index agrees."""
    directory = Path(directory)
    tensors: dict[str, tuple[SafetensorsHeader, TensorEntry]] = {}
    for path in weight_files(directory):
        header = read_header(path)
        for name, entry in header.tensors.items():
            if name in tensors:
                raise InputError(f"{path}: tensor {name!r} also appears in {tensors[name][0].path}")
            tensors[name] = (header, entry)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        for name, file in weight_map.items():
            if name not in tensors:
                raise InputError(f"{index}: names tensor {name!r} in {file}, which does not hold it")
            if tensors[name][0].path.name != file:
                raise InputError(
                    f"{index}: names tensor {name!r} in {file}, but it is in {tensors[name][0].path.name}"
                )
    return tensors


@dataclass(frozen=True)
class Run:
    """One run's checkpoints in step order, with the windows over them."""

    name: str
    pattern: str
    paths: dict[int, Path]
    """step -> checkpoint directory, in increasing step order"""
    incomplete: dict[Path, str]

    @property
    def steps(self) -> list[int]:
        return list(self.paths)

    def window(self, step: int, n: int) -> list[int]:
        """The trailing window of ``n`` consecutive checkpoints ending at ``step`` (inclusive)."""
        steps = self.steps
        if step not in self.paths:
            raise InputError(f"run {self.name}: no checkpoint at step {step}")
        end = steps.index(step) + 1
        if end < n:
            raise InputError(f"run {self.name}: the window of {n} checkpoints ending at step {step} would "
                             f"reach before the first checkpoint")
        return steps[end - n:end]

    def window_ends(self, n: int) -> list[int]:
        """The steps at which a full window of ``n`` checkpoints exists."""
        return self.steps[n - 1:]


def plan_run(name: str, pattern: str, largest_window: int, produced_steps: list[int] = ()) -> Run:
    """Discover a run's checkpoints; ``produced_steps`` are checkpoints a rule of the workflow will write
    (the demo's), counted as present. A run too short for the largest window is an error."""
    found = discover(pattern)
    paths = dict(found.complete)
    for step in produced_steps:
        paths.setdefault(step, checkpoint_path(pattern, step))
    paths = dict(sorted(paths.items()))
    _check_one_architecture(name, found.complete)
    needed = largest_window + 2
    if len(paths) < needed:
        raise InputError(
            f"run {name}: {len(paths)} complete checkpoint(s) match {pattern}, but the largest window "
            f"({largest_window}) needs at least {needed} (the window plus 2, for a final segment of 3 steps)"
            + (f"; incomplete: {', '.join(map(str, found.incomplete))}" if found.incomplete else "")
        )
    return Run(name, pattern, paths, found.incomplete)


def _check_one_architecture(name: str, checkpoints: dict[int, Path]) -> None:
    """Averages and ensembles only mean something within one model: refuse a run that mixes two."""
    reference_step, reference = None, None
    for step, directory in checkpoints.items():
        signature = architecture(read_config(directory))
        if reference is None:
            reference_step, reference = step, signature
        elif signature != reference:
            keys = sorted(key for key in reference.keys() | signature.keys()
                          if reference.get(key) != signature.get(key))
            raise InputError(
                f"run {name}: {directory / 'config.json'} describes another model than step {reference_step}'s "
                f"({checkpoints[reference_step] / 'config.json'}): they differ in {', '.join(keys)}"
            )
