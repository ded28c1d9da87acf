"""Checkpoints: discovery from a run's path pattern, completeness, and the tensor tables of weight files.

A run is described by a path pattern with one ``{step}`` placeholder, e.g.
``/data/run1/checkpoint-{step}``. Discovery lists the directories matching it, takes the integer in
place of ``{step}`` as the step and orders them numerically. A directory counts only once it is
complete, so that a checkpoint still being copied is never evaluated half-written.

Weight layouts read (``LAYOUTS``), the first one present winning, as in transformers:
``model.safetensors``; ``model.safetensors.index.json`` with its shards; ``pytorch_model.bin``;
``pytorch_model.bin.index.json`` with its shards. ``.bin`` files are ``torch.save`` archives (torch
1.6 or newer: a zip file of uncompressed records, the tensors' storages next to a pickle that
describes them). They are read here without torch and without running the pickle: ``_TorchUnpickler``
accepts only the names ``torch.save`` writes for a state dict of plain tensors, and turns each tensor
into its dtype, shape, strides and the absolute position of its bytes in the file, like a safetensors
header. A torch pickle that is not a zip archive (torch < 1.6, or ``pickle.dump``) is not read.

Completeness, for every weight file the layout names: present and non-empty; a safetensors file as
long as its header says; a ``.bin`` file a whole zip archive (its end-of-central-directory record is
the last thing written, and every record lies within the file) whose pickle parses and whose every
tensor lies within a storage record present in the archive. A directory whose weights are in another
format (GGUF, Flax, TensorFlow, Meta's ``consolidated.*.pth``, a DeepSpeed or Megatron checkpoint, a
legacy torch pickle, ...) is not incomplete but unsupported: ``Discovery.unsupported`` says what was
found and what is supported.

Errors caused by a checkpoint's own files (incomplete, corrupt or unsupported weights, an index that
names a tensor its shard lacks, a broken config.json, no tokenizer) are ``UnusableCheckpoint``;
``UnsupportedWeights`` is the subclass for a format that is not read.

Nothing here imports torch: the workflow calls it while parsing the DAG, and averaging reads ``.bin``
members without it. Only the functions used before inference, which loads torch anyway, import it:
``iter_tensors``, and ``check_model_dir``, to check that ``torch.load(weights_only=True, mmap=True)``,
which transformers uses, reads every ``.bin`` file as this module does.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_stability import layout
from ckpt_stability.errors import InputError, UnusableCheckpoint
from ckpt_stability.dcp_checkpoints import is_dcp_directory, read_dcp_headers
from ckpt_stability.native_formats import HF_FORMAT, native_incomplete_reason
from ckpt_stability.weight_formats import (UnsupportedWeights, WeightFileHeader, TensorEntry, check_with_torch,
                                           read_header, read_torch_file)

STEP = "{step}"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
LAYOUTS = (SINGLE_FILE, INDEX_FILE, BIN_FILE, BIN_INDEX_FILE)
"""the weight layouts read, in order of preference where a directory holds several (as transformers)"""
INDEX_FILES = (INDEX_FILE, BIN_INDEX_FILE)
SUPPORTED = ", ".join(LAYOUTS)


@dataclass(frozen=True)
class Discovery:
    """The checkpoints found for one run pattern."""

    complete: dict[int, Path]
    """step -> checkpoint directory, in increasing step order"""
    incomplete: dict[Path, str]
    """directory -> why it does not count (yet): still being copied, as far as can be told"""
    unsupported: dict[Path, str] = field(default_factory=dict)
    """directory -> its weights' format, which is not read ("unsupported weight format: found X;
    supported: ..."): it never counts as it is"""


def validate_pattern(pattern: str) -> None:
    if pattern.count(STEP) != 1:
        raise InputError(
            f"run pattern {pattern!r} must contain the placeholder {STEP} exactly once "
            f"(e.g. /data/run1/checkpoint-{STEP})"
        )


def checkpoint_path(pattern: str, step: int) -> Path:
    """The directory of ``step`` for a pattern (for checkpoints not on disk yet)."""
    return Path(pattern.replace(STEP, str(step)))


def discover(pattern: str, native_format: str = HF_FORMAT) -> Discovery:
    """Find the checkpoints of one run; see the module docstring. A run in a trainer's native format
    (``native_formats``) counts its checkpoints complete by that format's rule."""
    validate_pattern(pattern)
    prefix, suffix = pattern.split(STEP)
    matcher = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + r"/?")
    found: dict[int, Path] = {}
    incomplete: dict[Path, str] = {}
    unsupported: dict[Path, str] = {}
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
        if native_format == HF_FORMAT:
            problem = checkpoint_problem(path)
        else:
            reason = native_incomplete_reason(path, native_format)
            problem = None if reason is None else Problem(reason)
        if problem is None:
            found[step] = path
        elif problem.unsupported:
            unsupported[path] = problem.reason
        else:
            incomplete[path] = problem.reason
    return Discovery(dict(sorted(found.items())), incomplete, unsupported)


@dataclass(frozen=True)
class Problem:
    """Why a directory is not a usable checkpoint."""

    reason: str
    unsupported: bool = False
    """True: its weights are in a format that is not read; False: incomplete (maybe still being copied)"""


def incomplete_reason(directory: Path) -> str | None:
    """Why ``directory`` is not (yet) a complete checkpoint in a supported format, or None when it is."""
    problem = checkpoint_problem(directory)
    return None if problem is None else problem.reason


def checkpoint_problem(directory: Path) -> Problem | None:
    """Why ``directory`` is not a complete checkpoint in a supported format, or None when it is one."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        return Problem("config.json is missing")
    try:
        read_config(directory)
    except InputError as error:
        return Problem(str(error).removeprefix(f"{directory / 'config.json'}: "))
    layout = _layout(directory)
    if layout is None:
        return _no_layout_problem(directory)
    if layout in INDEX_FILES:
        try:
            names = _index_weight_files(directory / layout)
        except UnusableCheckpoint:
            return Problem(f"{layout} is not a valid index (no weight_map); it may still be being written")
        for name in names:
            problem = _weight_file_problem(directory / name)
            if problem is not None:
                return _file_problem(f"{name} (named by {layout})", problem)
        return None
    problem = _weight_file_problem(directory / layout)
    return None if problem is None else _file_problem(layout, problem)


def _file_problem(name: str, problem: Problem) -> Problem:
    if problem.unsupported:
        return Problem(f"unsupported weight format: found {name}: {problem.reason}; supported: {SUPPORTED}", True)
    return Problem(f"{name} {problem.reason}")


def _layout(directory: Path) -> str | None:
    return next((name for name in LAYOUTS if (directory / name).exists()), None)


SHARD = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")
TRAINING_STATE = re.compile(r"optim|scheduler|rng_state|random_states|training_args|scaler|trainer_state|"
                            r"^zero_to_fp32", re.IGNORECASE)
"""files of a training checkpoint that are not the model's weights: never taken for them"""
OTHER_WEIGHTS = (
    (re.compile(r"consolidated\.(\d+\.)?pth"), "Meta's consolidated checkpoint format"),
    (re.compile(r"mp_rank_\d+.*\.pt"), "a DeepSpeed or Megatron model-parallel checkpoint"),
    (re.compile(r"adapter_model\.(safetensors|bin)"), "a PEFT adapter, not a whole model"),
    (re.compile(r".*\.gguf"), "GGUF"),
    (re.compile(r".*\.msgpack"), "Flax"),
    (re.compile(r".*\.(h5|keras)"), "TensorFlow/Keras"),
    (re.compile(r".*\.distcp"), "a torch.distributed checkpoint"),
    (re.compile(r".*\.(pt|pth|ckpt|bin|safetensors|npz|npy|onnx|nemo|pkl)"), None),
)
"""weight files of formats (or names) that are not read, with what they are where the name tells"""
OTHER_WEIGHT_DIRECTORIES = (
    (re.compile(r"global_step\d+"), "a DeepSpeed checkpoint; its zero_to_fp32.py writes pytorch_model.bin"),
    (re.compile(r"mp_rank_\d+(_\d+)*"), "a Megatron-LM checkpoint"),
)


def _no_layout_problem(directory: Path) -> Problem:
    """None of LAYOUTS is present: still being copied, or weights in a format that is not read?"""
    entries = sorted(directory.iterdir(), key=lambda path: path.name)
    for path in entries:
        match = SHARD.fullmatch(path.name)
        if match is not None and path.is_file():
            index = INDEX_FILE if match.group(2) == "safetensors" else BIN_INDEX_FILE
            return Problem(f"{path.name} is present but not {index}")
    found = []
    for path in entries:
        if TRAINING_STATE.search(path.name):
            continue
        patterns = OTHER_WEIGHTS if path.is_file() else OTHER_WEIGHT_DIRECTORIES if path.is_dir() else ()
        for pattern, what in patterns:
            if pattern.fullmatch(path.name):
                found.append(f"{path.name}{'/' if path.is_dir() else ''}" + (f" ({what})" if what else ""))
                break
    if found:
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        return Problem(f"unsupported weight format: found {', '.join(found[:3])}{more}; supported: {SUPPORTED}",
                       True)
    return Problem(f"neither {', '.join(LAYOUTS[:-1])} nor {LAYOUTS[-1]} is present")


def _index_weight_files(index: Path) -> list[str]:
    """The weight files an index names, in order of first mention."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return list(dict.fromkeys(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        raise UnusableCheckpoint(f"{index}: not a valid index (no weight_map)") from None


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UnusableCheckpoint(f"{path}: config.json is not UTF-8 text") from None
    except ValueError as error:
        raise UnusableCheckpoint(f"{path}: config.json is not valid JSON ({error})") from None
    except OSError as error:
        raise UnusableCheckpoint(f"{path}: cannot read config.json ({error.strerror})") from None
    if not isinstance(config, dict):
        raise UnusableCheckpoint(f"{path}: config.json is not a JSON object")
    return config


NON_ARCHITECTURE_KEYS = frozenset({"_name_or_path", "name_or_path", "transformers_version", "_commit_hash"})
"""config.json keys that name or date a checkpoint without changing the model"""


def architecture(config: dict) -> dict:
    """What must be equal between checkpoints of one run: their config minus names and versions."""
    return {key: value for key, value in config.items() if key not in NON_ARCHITECTURE_KEYS}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
DEFINITION_FILE_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                            "*.model", "*.tiktoken", "chat_template*", "generation_config.json")
"""the files besides config.json that shape how a model answers (tokenizer, generation defaults); the
training leftovers of a checkpoint directory (optimizer and trainer states) are not among them"""


def model_identity(directory: str | Path) -> str:
    """A digest of everything but the weights that makes a model answer as it does: its architecture
    (config.json without names and versions) and its tokenizer and generation files. Two models with
    the same identity differ only in their weights, so one loaded model can take the other's weights in
    place (``Backend.swap_weights``)."""
    directory = Path(directory)
    digest = hashlib.sha256(json.dumps(architecture(read_config(directory)), sort_keys=True).encode())
    names = sorted({path.name for pattern in DEFINITION_FILE_PATTERNS for path in directory.glob(pattern)
                    if path.is_file()})
    for name in names:
        digest.update(f"\0{name}\0".encode())
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()


def iter_tensors(path: str | Path):
    """(name, tensor) of every tensor of one weight file, one at a time where the format allows (torch)."""
    import torch
    from safetensors import safe_open

    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
    else:
        yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()


def assets_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot give a model its config.json and tokenizer, or None."""
    if not directory.is_dir():
        return "not a directory"
    try:
        read_config(directory)
    except InputError as error:
        return str(error)
    return _tokenizer_problem(directory)


def _tokenizer_problem(directory: Path) -> str | None:
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return f"no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
    return None


def check_model_dir(directory: str | Path) -> None:
    """Everything inference needs, checked before loading, so that a broken checkpoint is an error that
    names the file and the problem rather than a traceback from deep inside a library. ``.bin`` weights
    are also opened with ``torch.load(weights_only=True, mmap=True)``, as transformers loads them."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory")
    read_config(directory)
    tensors = read_checkpoint_headers(directory)
    headers = {header.path: header for header, _ in tensors.values()}
    for header in headers.values():
        if header.format == "torch":
            check_with_torch(header)
    problem = _tokenizer_problem(directory)
    if problem is not None:
        raise UnusableCheckpoint(f"{directory}: {problem}")


def _weight_file_problem(path: Path) -> Problem | None:
    if not path.is_file():
        return Problem("is missing")
    if path.stat().st_size == 0:
        return Problem("is empty")
    try:
        if path.name.endswith(".safetensors"):
            read_header(path)
        elif path.name.endswith(".bin"):
            read_torch_file(path, locate=False)
        else:
            return Problem("is neither a .safetensors nor a .bin file", True)
    except UnsupportedWeights as error:
        return Problem(str(error).removeprefix(f"{path}: "), True)
    except InputError as error:
        return Problem("is unreadable: " + str(error).removeprefix(f"{path}: "))
    return None


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a complete checkpoint, in index order; an UnusableCheckpoint names what is
    wrong (UnsupportedWeights for a format that is not read)."""
    directory = Path(directory)
    problem = checkpoint_problem(directory)
    if problem is not None:
        if problem.unsupported:
            raise UnsupportedWeights(f"{directory}: {problem.reason}")
        raise UnusableCheckpoint(f"{directory}: not a complete checkpoint: {problem.reason}")
    layout = _layout(directory)
    if layout in INDEX_FILES:
        return [directory / name for name in _index_weight_files(directory / layout)]
    return [directory / layout]


def read_weight_file(path: str | Path) -> WeightFileHeader:
    """The tensor table of a safetensors file or of a torch.save archive (``.bin``)."""
    path = Path(path)
    return read_torch_file(path) if path.name.endswith(".bin") else read_header(path)


def read_checkpoint_headers(directory: str | Path) -> dict[str, tuple[WeightFileHeader, TensorEntry]]:
    """tensor name -> (its file's header, its entry), over all shards; checks the index agrees. A directory
    saved by torch.distributed.checkpoint is read as ``dcp_checkpoints`` does."""
    directory = Path(directory)
    if is_dcp_directory(directory):
        return read_dcp_headers(directory)
    tensors: dict[str, tuple[WeightFileHeader, TensorEntry]] = {}
    for path in weight_files(directory):
        header = read_weight_file(path)
        for name, entry in header.tensors.items():
            if name in tensors:
                raise UnusableCheckpoint(f"{path}: tensor {name!r} also appears in {tensors[name][0].path}")
            tensors[name] = (header, entry)
    layout = _layout(directory)
    if layout in INDEX_FILES:
        index = directory / layout
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        for name, file in weight_map.items():
            if name not in tensors:
                raise UnusableCheckpoint(f"{index}: names tensor {name!r} in {file}, which does not hold it")
            if tensors[name][0].path.name != file:
                raise UnusableCheckpoint(
                    f"{index}: names tensor {name!r} in {file}, but it is in {tensors[name][0].path.name}"
                )
    return tensors


# ---------------------------------------------------------------- runs and windows


@dataclass(frozen=True)
class Run:
    """One run's checkpoints in step order, with the windows over them."""

    name: str
    pattern: str
    paths: dict[int, Path]
    """step -> checkpoint directory, in increasing step order"""
    incomplete: dict[Path, str]
    unsupported: dict[Path, str] = field(default_factory=dict)
    """directory -> its weight format, which is not read (see ``Discovery.unsupported``)"""
    convert: str | None = None
    """the command that turns each checkpoint into a Hugging Face directory (``conversion``), if any"""
    hf_assets: Path | None = None
    """torch.distributed checkpoints read in place: the directory of their config.json and tokenizer"""

    @property
    def steps(self) -> list[int]:
        return list(self.paths)

    @property
    def converted(self) -> bool:
        """Its checkpoints are evaluated through the workflow's convert rule (a command, or written from a
        torch.distributed checkpoint by this package)."""
        return self.convert is not None or self.hf_assets is not None

    def model_path(self, step: int) -> Path:
        """The Hugging Face directory of ``step``: the checkpoint itself, or its conversion (written by the
        workflow's convert rule)."""
        if not self.converted:
            return self.paths[step]
        return Path(layout.fill(layout.CONVERTED, run=self.name, step=step))

    def average_member(self, step: int) -> Path:
        """What averages read for ``step``: a torch.distributed checkpoint in place, else ``model_path``."""
        return self.paths[step] if self.hf_assets is not None else self.model_path(step)

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


def plan_run(name: str, pattern: str, largest_window: int, produced_steps: list[int] = (), *,
             native_format: str = HF_FORMAT, convert: str | None = None, hf_assets: Path | None = None) -> Run:
    """Discover a run's checkpoints; ``produced_steps`` are checkpoints a rule of the workflow will write
    (the demo's), counted as present; ``native_format`` and ``convert``: a run in a trainer's format and
    its converter, or the config and tokenizer of its torch.distributed checkpoints. A run too short for the
    largest window is an error."""
    found = discover(pattern, native_format)
    paths = dict(found.complete)
    for step in produced_steps:
        paths.setdefault(step, checkpoint_path(pattern, step))
    paths = dict(sorted(paths.items()))
    if convert is None and hf_assets is None:  # converted ones are checked one by one, once converted
        _check_one_architecture(name, found.complete)
    needed = largest_window + 2
    if len(paths) < needed:
        raise InputError(
            f"run {name}: {len(paths)} complete checkpoint(s) match {pattern}, but the largest window "
            f"({largest_window}) needs at least {needed} (the window plus 2, for a final segment of 3 steps)"
            + (f"; incomplete: {', '.join(map(str, found.incomplete))}" if found.incomplete else "")
            + (f"; in an unsupported weight format: {', '.join(map(str, found.unsupported))} "
               f"(supported: {SUPPORTED})" if found.unsupported else "")
        )
    return Run(name, pattern, paths, found.incomplete, found.unsupported, convert, hf_assets)


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
