"""Weight files: the tensor table of a safetensors file or of a ``torch.save`` archive (``.bin``), read
without torch and without loading any tensor.

A safetensors file is an 8-byte header length, a JSON header, then the data. A ``.bin`` file (torch 1.6
or newer) is a zip archive of uncompressed records: the tensors' storages next to a pickle that describes
them. It is read without running the pickle: ``_TorchUnpickler`` accepts only the names ``torch.save``
writes for a state dict of plain tensors, and turns each tensor into its dtype, shape, strides and the
absolute position of its bytes in the file, like a safetensors header. A torch pickle that is not a zip
archive (torch < 1.6, or ``pickle.dump``) is not read.

Errors caused by the file (truncated, corrupt) are ``UnusableCheckpoint``; ``UnsupportedWeights`` is
its subclass for a format that is not read. Only ``check_with_torch`` (before inference, which loads
torch anyway) imports torch.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ckpt_stability.errors import UnusableCheckpoint


class UnsupportedWeights(UnusableCheckpoint):
    """Weights in a format this tool does not read; the message says what was found."""


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
    pieces: tuple[Piece, ...] = ()
    """a tensor stored in several runs of elements, in several files (a torch.distributed checkpoint saved
    by several ranks), in element order; empty: the whole tensor is at ``begin`` in its file"""


@dataclass(frozen=True)
class Piece:
    """Elements [first, first + count) of a tensor, stored contiguously at byte ``begin`` of ``path``."""

    path: Path
    begin: int
    first: int
    count: int


@dataclass(frozen=True)
class WeightFileHeader:
    """The tensor table of one weight file."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    format: str = "safetensors"
    """"safetensors" or "torch" (a torch.save zip archive)"""



Table = dict[str, tuple[WeightFileHeader, TensorEntry]]
"""one checkpoint's tensors: name -> (its file's header, its entry)"""

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


def read_torch_file(path: str | Path, *, locate: bool = True) -> WeightFileHeader:
    """The tensor table of a torch.save zip archive holding a state dict, with ``locate`` the absolute
    position of every tensor's bytes (one small read per storage record; discovery skips it).

    Truncated or damaged: an UnusableCheckpoint. Not a supported torch archive (a legacy pickle, a
    whole pickled model, quantized or sparse tensors, a big-endian or compressed archive):
    UnsupportedWeights. Neither imports torch nor reads tensor data.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        archive = _Archive(handle, path, 0, path.stat().st_size)
        state = archive.load()
        if not isinstance(state, dict):
            raise _torch_problem(path, f"holding a pickled {type(state).__name__}, not a state dict "
                                       f"(tensor name -> tensor)")
        for name, value in state.items():
            if not isinstance(name, str) or not isinstance(value, _TensorRef):
                raise _torch_problem(path, f"holding entry {name!r} = {type(value).__name__}, not a state dict "
                                           f"of tensors only")
        tensors = {name: archive.entry(name, tensor, locate) for name, tensor in state.items()}
    return WeightFileHeader(path, tensors, {}, "torch")


def read_torch_tensor(path: str | Path, offset: int, length: int, name: str) -> TensorEntry:
    """The entry of the one tensor that ``torch.save(tensor)`` wrote at bytes [offset, offset + length) of
    ``path`` (an item of a torch.distributed.checkpoint data file), located absolutely in ``path``."""
    path = Path(path)
    with open(path, "rb") as handle:
        if offset + length > path.stat().st_size:
            raise UnusableCheckpoint(f"{path}: truncated (tensor {name!r} is announced at bytes {offset} to "
                                     f"{offset + length}, the file has {path.stat().st_size})")
        archive = _Archive(_FileSlice(handle, offset, length), path, offset, length)
        tensor = archive.load()
        if not isinstance(tensor, _TensorRef):
            raise _torch_problem(path, f"holding a pickled {type(tensor).__name__} at byte {offset}, where "
                                       f"tensor {name!r} should be")
        return archive.entry(name, tensor, True)


class _FileSlice(io.RawIOBase):
    """Bytes [start, start + length) of an open file, as a file of their own (for zipfile)."""

    def __init__(self, handle, start: int, length: int) -> None:
        super().__init__()
        self.handle, self.start, self.length, self.position = handle, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.length - self.position))
        self.handle.seek(self.start + self.position)
        got = self.handle.readinto(memoryview(buffer)[:count])
        self.position += got
        return got


class _Archive:
    """A torch.save zip archive at byte ``base`` of ``path`` (``handle`` reads it from its own byte 0): its
    records, checked, and its pickle, read without running it."""

    def __init__(self, handle, path: Path, base: int, size: int) -> None:
        self.handle, self.path, self.base = handle, path, base
        magic = handle.read(4)
        if magic[:1] == b"\x80" and magic[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            raise _torch_problem(path, "a plain pickle (torch's legacy serialization of torch < 1.6, not its "
                                       "zip format)")
        if magic != b"PK\x03\x04":
            raise UnusableCheckpoint(f"{path}: not a torch.save zip archive (it starts with {magic!r}"
                                     f"{f' at byte {base}' if base else ''})")
        try:
            self.archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            raise UnusableCheckpoint(f"{path}: truncated or damaged zip archive ({error}; a copy in progress?)") \
                from None
        self.records = {info.filename: info for info in self.archive.infolist()}
        self.end = getattr(self.archive, "start_dir", size)
        for info in self.records.values():
            if info.header_offset + 30 + len(info.orig_filename.encode()) + info.compress_size > self.end:
                raise UnusableCheckpoint(f"{path}: truncated zip archive (record {info.filename!r} ends "
                                         f"past the start of the central directory at byte {base + self.end})")
        self.starts: dict[str, int] = {}

    def load(self):
        """The pickled object, its tensors as ``_TensorRef``."""
        path, records = self.path, self.records
        pickles = [name for name in records if name.endswith("data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise _torch_problem(path, "a zip archive without one <archive>/data.pkl: not a torch.save file")
        self.prefix = pickles[0].removesuffix("data.pkl")
        byteorder = records.get(self.prefix + "byteorder")
        if byteorder is not None and self.archive.read(byteorder).strip() != b"little":
            raise _torch_problem(path, "a big-endian torch archive")
        if records[pickles[0]].file_size > MAX_PICKLE_BYTES:
            raise _torch_problem(path, f"a {records[pickles[0]].file_size}-byte pickle: not a state dict")
        try:
            return _TorchUnpickler(self.archive.read(pickles[0])).load()
        except _Refused as refused:
            raise _torch_problem(path, f"holding {refused}") from None
        except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
                IndexError, AttributeError, RecursionError, OverflowError, struct.error) as error:
            raise UnusableCheckpoint(f"{path}: {pickles[0]} is damaged ({type(error).__name__}: {error})") \
                from None

    def entry(self, name: str, tensor: _TensorRef, locate: bool) -> TensorEntry:
        """Where ``tensor``'s bytes are, absolutely in the file, once checked against its storage record."""
        path = self.path
        record = self.records.get(f"{self.prefix}data/{tensor.storage.key}")
        if record is None:
            raise UnusableCheckpoint(f"{path}: tensor {name!r}: its storage record "
                                     f"{self.prefix}data/{tensor.storage.key} is missing from the archive")
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
        if locate and record.filename not in self.starts:
            self.starts[record.filename] = self.base + _record_data_start(self.handle, record, self.end, path)
        base = self.starts.get(record.filename, 0) + tensor.offset * item
        contiguous = count == 0 or all(
            stride == math.prod(tensor.shape[axis + 1:])
            for axis, (dim, stride) in enumerate(zip(tensor.shape, tensor.strides)) if dim != 1)
        return TensorEntry(name, tensor.dtype, tensor.shape, base,
                           base + (count if contiguous else max(extent - tensor.offset, 0)) * item,
                           None if contiguous else tensor.strides)


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


def check_with_torch(header: WeightFileHeader) -> None:
    """``torch.load(weights_only=True, mmap=True)`` reads the file as ``read_torch_file`` does."""
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
