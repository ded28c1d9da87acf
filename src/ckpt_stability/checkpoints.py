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
members without it. Only ``check_model_dir`` (before inference, which loads torch anyway) imports it,
to check that ``torch.load(weights_only=True, mmap=True)``, which transformers uses, reads every
``.bin`` file as this module does.
"""

from __future__ import annotations

import glob
import io
import json
import math
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_stability.errors import InputError, UnusableCheckpoint

STEP = "{step}"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
LAYOUTS = (SINGLE_FILE, INDEX_FILE, BIN_FILE, BIN_INDEX_FILE)
"""the weight layouts read, in order of preference where a directory holds several (as transformers)"""
INDEX_FILES = (INDEX_FILE, BIN_INDEX_FILE)
SUPPORTED = ", ".join(LAYOUTS)


class UnsupportedWeights(UnusableCheckpoint):
    """Weights in a format this tool does not read; the message says what was found."""


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


def discover(pattern: str) -> Discovery:
    """Find the checkpoints of one run; see the module docstring."""
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
        problem = checkpoint_problem(path)
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
            _check_with_torch(header)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise UnusableCheckpoint(f"{directory}: no tokenizer (none of {', '.join(TOKENIZER_FILES)})")


def _weight_file_problem(path: Path) -> Problem | None:
    if not path.is_file():
        return Problem("is missing")
    if path.stat().st_size == 0:
        return Problem("is empty")
    try:
        if path.name.endswith(".safetensors"):
            read_header(path)
        elif path.name.endswith(".bin"):
            _read_torch_file(path, locate=False)
        else:
            return Problem("is neither a .safetensors nor a .bin file", True)
    except UnsupportedWeights as error:
        return Problem(str(error).removeprefix(f"{path}: "), True)
    except InputError as error:
        return Problem("is unreadable: " + str(error).removeprefix(f"{path}: "))
    return None


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    """absolute byte offset of the tensor's data (of its first element) in the file"""
    end: int
    """absolute byte offset just past the tensor's data (past its last element)"""
    strides: tuple[int, ...] | None = None
    """None: the data is contiguous, in row-major order; else the strides in elements of a tensor saved
    as a view (``.bin`` files only)"""


@dataclass(frozen=True)
class WeightFileHeader:
    """The tensor table of one weight file."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    format: str = "safetensors"
    """"safetensors" or "torch" (a torch.save zip archive)"""


SafetensorsHeader = WeightFileHeader


DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(path: str | Path) -> WeightFileHeader:
    """Parse a safetensors header and check that the file holds every byte it announces.

    A file shorter than its header says is truncated (or still being copied): an UnusableCheckpoint
    names it.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise UnusableCheckpoint(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise UnusableCheckpoint(
                f"{path}: truncated safetensors file (header of {header_len} bytes announced, "
                f"file has {size} bytes)"
            )
        try:
            raw = json.loads(handle.read(header_len))
        except ValueError as error:
            raise UnusableCheckpoint(f"{path}: safetensors header is not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise UnusableCheckpoint(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + header_len
    metadata = raw.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in raw.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UnusableCheckpoint(f"{path}: safetensors header entry for tensor {name!r} is malformed") from None
        count = 1
        for dim in shape:
            count *= dim
        if dtype in DTYPE_SIZES and end - begin != count * DTYPE_SIZES[dtype]:
            raise UnusableCheckpoint(
                f"{path}: tensor {name!r} has {end - begin} bytes, its dtype {dtype} and shape "
                f"{list(shape)} need {count * DTYPE_SIZES[dtype]}"
            )
        tensors[name] = TensorEntry(name, dtype, shape, data_start + begin, data_start + end)
    if tensors:
        last = max(tensors.values(), key=lambda entry: entry.end)
        if last.end > size:
            raise UnusableCheckpoint(
                f"{path}: truncated safetensors file ({size} bytes; tensor {last.name!r} ends at byte "
                f"{last.end})"
            )
    return WeightFileHeader(path, tensors, metadata)


# ---------------------------------------------------------------- torch.save archives (.bin)

STORAGE_DTYPES = {"DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
                  "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
                  "ByteStorage": "U8", "BoolStorage": "BOOL"}
"""torch's typed storage classes (``_rebuild_tensor_v2``) -> dtype"""
TORCH_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16",
                "uint32": "U32", "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
"""torch dtype names (``_rebuild_tensor_v3`` of an untyped storage, and torch.load's tensors) -> dtype"""
MAX_PICKLE_BYTES = 1 << 28
"""a state dict's pickle is about 200 bytes per tensor: anything near this is not one"""


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: str | None
    """None: an untyped storage (its tensors name their dtype); "?": a storage of an unsupported dtype"""


@dataclass(frozen=True)
class _Dtype:
    name: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str | None
    size: int
    """elements (typed storage) or bytes (untyped storage)"""


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    """in elements of ``dtype``"""
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str


class _Refused(Exception):
    """The pickle holds something other than a state dict of plain tensors."""


class _TensorType:
    """torch.Tensor and torch.nn.Parameter, as ``_rebuild_from_type_v2`` names them."""


def _rebuild_tensor_v2(storage, offset, shape, strides, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise _Refused("a tensor whose storage is not a storage record")
    if storage.dtype is None:
        raise _Refused("an untyped storage without a dtype")
    return _tensor_ref(storage, offset, shape, strides, storage.dtype)


def _rebuild_tensor_v3(storage, offset, shape, strides, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(storage, _Storage) or not isinstance(dtype, _Dtype):
        raise _Refused("a tensor whose storage is not a storage record")
    if dtype.name not in TORCH_DTYPES:
        raise _Refused(f"a tensor of dtype torch.{dtype.name}, which is not supported")
    return _tensor_ref(storage, offset, shape, strides, TORCH_DTYPES[dtype.name])


def _tensor_ref(storage, offset, shape, strides, dtype) -> _TensorRef:
    shape, strides = tuple(shape), tuple(strides)
    if not (isinstance(offset, int) and len(shape) == len(strides)
            and all(isinstance(value, int) and value >= 0 for value in (offset, *shape, *strides))):
        raise _Refused("a tensor with a malformed shape, strides or offset")
    return _TensorRef(storage, offset, shape, strides, dtype)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    return data


def _rebuild_from_type_v2(function, new_type, args, state):
    if new_type is not _TensorType or function not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter):
        raise _Refused("a tensor subclass")
    return function(*args)


def _not_plain(kind: str):
    def refuse(*args):
        raise _Refused(f"a {kind} tensor (only plain dense tensors are read)")
    return refuse


def _torch_size(values=()):
    return tuple(values)


class _TorchUnpickler(pickle.Unpickler):
    """Reads the pickle of a torch.save archive holding a state dict: only the names torch writes for
    plain tensors resolve, each to a harmless stand-in here; no torch code runs and nothing is loaded."""

    GLOBALS = {
        "collections.OrderedDict": OrderedDict,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.Tensor": _TensorType,
        "torch.nn.parameter.Parameter": _TensorType,
        "torch.Size": _torch_size,
        "torch._utils._rebuild_qtensor": _not_plain("quantized"),
        "torch._utils._rebuild_sparse_tensor": _not_plain("sparse"),
        "torch._utils._rebuild_nested_tensor": _not_plain("nested"),
        "torch._utils._rebuild_wrapper_subclass": _not_plain("subclass"),
        "torch._utils._rebuild_meta_tensor_no_storage": _not_plain("meta (data-less)"),
        "torch._utils._rebuild_device_tensor_from_numpy": _not_plain("numpy-backed"),
        "torch._utils._rebuild_device_tensor_from_cpu_tensor": _not_plain("device"),
    }

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        qualified = f"{module}.{name}"
        if qualified in self.GLOBALS:
            return self.GLOBALS[qualified]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name, "?")
        if qualified in ("torch.storage.UntypedStorage", "torch.UntypedStorage"):
            return _StorageType(name, None)
        if module == "torch" and name in TORCH_DTYPES:
            return _Dtype(name)
        if module == "torch" and re.fullmatch(r"(float|int|uint|complex|q|bits)[0-9a-z_]*", name):
            return _Dtype(name)
        raise _Refused(f"a pickled {qualified} (only a state dict of plain tensors is read)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise _Refused("a persistent reference that is not a storage")
        kind, key, size = pid[1], pid[2], pid[4]
        if kind.dtype == "?":
            raise _Refused(f"a torch.{kind.name}, which is not supported")
        storage = _Storage(key, kind.dtype, size)
        known = self.storages.setdefault(key, storage)
        if known != storage:
            raise _Refused(f"storage {key} saved twice with different types")
        return known


def _torch_problem(path: Path, what: str) -> UnsupportedWeights:
    return UnsupportedWeights(f"{path}: {what}")


def _read_torch_file(path: str | Path, *, locate: bool = True) -> WeightFileHeader:
    """The tensor table of a torch.save zip archive holding a state dict, with ``locate`` the absolute
    position of every tensor's bytes (one small read per storage record; discovery skips it).

    Truncated or damaged: an UnusableCheckpoint. Not a supported torch archive (a legacy pickle, a
    whole pickled model, quantized or sparse tensors, a big-endian or compressed archive):
    UnsupportedWeights. Neither imports torch nor reads tensor data.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        magic = handle.read(4)
        if magic[:1] == b"\x80" and magic[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            raise _torch_problem(path, "a plain pickle (torch's legacy serialization of torch < 1.6, not its "
                                       "zip format)")
        if magic != b"PK\x03\x04":
            raise UnusableCheckpoint(f"{path}: not a torch.save zip archive (it starts with {magic!r})")
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            raise UnusableCheckpoint(f"{path}: truncated or damaged zip archive ({error}; a copy in progress?)") \
                from None
        with archive:
            records = {info.filename: info for info in archive.infolist()}
            end = getattr(archive, "start_dir", size)
            for info in records.values():
                if info.header_offset + 30 + len(info.orig_filename.encode()) + info.compress_size > end:
                    raise UnusableCheckpoint(f"{path}: truncated zip archive (record {info.filename!r} ends "
                                             f"past the start of the central directory at byte {end})")
            pickles = [name for name in records if name.endswith("data.pkl") and name.count("/") == 1]
            if len(pickles) != 1:
                raise _torch_problem(path, "a zip archive without one <archive>/data.pkl: not a torch.save file")
            prefix = pickles[0].removesuffix("data.pkl")
            byteorder = records.get(prefix + "byteorder")
            if byteorder is not None and archive.read(byteorder).strip() != b"little":
                raise _torch_problem(path, "a big-endian torch archive")
            if records[pickles[0]].file_size > MAX_PICKLE_BYTES:
                raise _torch_problem(path, f"a {records[pickles[0]].file_size}-byte pickle: not a state dict")
            try:
                unpickler = _TorchUnpickler(archive.read(pickles[0]))
                state = unpickler.load()
            except _Refused as refused:
                raise _torch_problem(path, f"holding {refused}") from None
            except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
                    IndexError, AttributeError, RecursionError, OverflowError, struct.error) as error:
                raise UnusableCheckpoint(f"{path}: {pickles[0]} is damaged ({type(error).__name__}: {error})") \
                    from None
            if not isinstance(state, dict):
                raise _torch_problem(path, f"holding a pickled {type(state).__name__}, not a state dict "
                                           f"(tensor name -> tensor)")
            for name, value in state.items():
                if not isinstance(name, str) or not isinstance(value, _TensorRef):
                    raise _torch_problem(path, f"holding entry {name!r} = {type(value).__name__}, not a state dict "
                                               f"of tensors only")
            starts: dict[str, int] = {}
            tensors = {}
            for name, tensor in state.items():
                record = records.get(f"{prefix}data/{tensor.storage.key}")
                if record is None:
                    raise UnusableCheckpoint(f"{path}: tensor {name!r}: its storage record "
                                             f"{prefix}data/{tensor.storage.key} is missing from the archive")
                if record.compress_type != zipfile.ZIP_STORED:
                    raise _torch_problem(path, f"a compressed storage record ({record.filename})")
                item = DTYPE_SIZES[tensor.dtype]
                storage_bytes = tensor.storage.size * (item if tensor.storage.dtype else 1)
                if record.file_size < storage_bytes:
                    raise UnusableCheckpoint(f"{path}: storage record {record.filename} has {record.file_size} "
                                             f"bytes, its storage {storage_bytes}")
                count = math.prod(tensor.shape)
                last = tensor.offset + sum((dim - 1) * stride for dim, stride in zip(tensor.shape, tensor.strides))
                extent = 0 if count == 0 else last + 1
                if extent * item > storage_bytes:
                    raise UnusableCheckpoint(f"{path}: tensor {name!r} reaches past the end of its storage "
                                             f"({record.filename}, {storage_bytes} bytes)")
                if locate and record.filename not in starts:
                    starts[record.filename] = _record_data_start(handle, record, end, path)
                base = starts.get(record.filename, 0) + tensor.offset * item
                contiguous = count == 0 or all(
                    stride == math.prod(tensor.shape[axis + 1:])
                    for axis, (dim, stride) in enumerate(zip(tensor.shape, tensor.strides)) if dim != 1)
                tensors[name] = TensorEntry(
                    name, tensor.dtype, tensor.shape, base,
                    base + (count if contiguous else max(extent - tensor.offset, 0)) * item,
                    None if contiguous else tensor.strides)
    return WeightFileHeader(path, tensors, {}, "torch")


def _record_data_start(handle, record: zipfile.ZipInfo, end: int, path: Path) -> int:
    """The absolute offset of a stored record's data: past its local header, whose extra field (torch's
    alignment padding) differs from the central directory's."""
    handle.seek(record.header_offset)
    local = handle.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise UnusableCheckpoint(f"{path}: zip record {record.filename!r} has no local header")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    start = record.header_offset + 30 + name_length + extra_length
    if start + record.compress_size > end:
        raise UnusableCheckpoint(f"{path}: truncated zip archive (record {record.filename!r} ends past the "
                                 f"central directory)")
    return start


def _check_with_torch(header: WeightFileHeader) -> None:
    """``torch.load(weights_only=True, mmap=True)`` reads the file as ``_read_torch_file`` does."""
    import torch

    try:
        state = torch.load(header.path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any failure to load is the file's
        raise UnusableCheckpoint(f"{header.path}: torch.load(weights_only=True) cannot read it: "
                                 f"{type(error).__name__}: {error}") from None
    try:
        table = {name: (TORCH_DTYPES.get(str(tensor.dtype).removeprefix("torch.")), tuple(tensor.shape))
                 for name, tensor in state.items()}
    finally:
        del state
    expected = {name: (entry.dtype, entry.shape) for name, entry in header.tensors.items()}
    if table != expected:
        differing = sorted(name for name in table.keys() | expected.keys() if table.get(name) != expected.get(name))
        raise UnusableCheckpoint(f"{header.path}: torch.load reads tensor {differing[0]!r} as "
                                 f"{table.get(differing[0])}, this tool as {expected.get(differing[0])}")


# ---------------------------------------------------------------- a checkpoint's tensors


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
    return _read_torch_file(path) if path.name.endswith(".bin") else read_header(path)


def read_checkpoint_headers(directory: str | Path) -> dict[str, tuple[WeightFileHeader, TensorEntry]]:
    """tensor name -> (its file's header, its entry), over all shards; checks the index agrees."""
    directory = Path(directory)
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
            + (f"; in an unsupported weight format: {', '.join(map(str, found.unsupported))} "
               f"(supported: {SUPPORTED})" if found.unsupported else "")
        )
    return Run(name, pattern, paths, found.incomplete, found.unsupported)


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
