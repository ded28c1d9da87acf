"""Checkpoints saved by ``torch.distributed.checkpoint`` (DCP), read tensor by tensor in one process, with no
process group, and without loading any tensor: the tensor table that averaging streams from, as for
safetensors and ``.bin`` files (``weight_formats``).

A DCP directory holds ``.metadata`` (a pickle of ``torch.distributed.checkpoint.metadata.Metadata``) and data
files ``__<rank>_<n>.distcp``. ``.metadata`` is read without torch and without running the pickle
(``_MetadataUnpickler``: only the names torch writes there resolve, to stand-ins), which keeps torch's import
(seconds, and a quarter GB of memory) out of every averaging job, and code out of a pickle from disk. torch's
``FileSystemWriter`` (``torch/distributed/checkpoint/filesystem.py``, ``_write_item``) writes each tensor, or
each rank's chunk of it, as one ``torch.save(tensor)`` zip archive at the byte range that ``storage_data``
gives; the archive stores the tensor's bytes uncompressed, so they are located in the data file
(``weight_formats.read_torch_tensor``) and read from there in place.

The tensors' names are the Hugging Face ones when the model's ``state_dict()`` was saved as it is
(``dcp.save(model.state_dict())``), or nested under ``model`` (accelerate's FSDP ``SHARDED_STATE_DICT``,
``pytorch_model_fsdp_0/``, and torch's ``dcp.save({"model": ..., "optimizer": ...})``): ``planner_data`` maps
each flattened key to its path in the saved dict, and the tensors under ``model`` are taken with the rest of
their path as their name; the optimizer's state is left out.

A tensor saved by several ranks is stored in chunks. Chunks along the first dimension (FSDP's ``Shard(0)``)
are runs of consecutive elements: they are read in place, as ``weight_formats.Piece``. Other chunkings
(tensor parallelism along another dimension) and data files written through a stream transform
(compression) are refused as UnsupportedWeights: such a run takes a ``convert`` command.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
from pathlib import Path

from ckpt_stability.errors import UnusableCheckpoint
from ckpt_stability.weight_formats import (DTYPE_SIZES, TORCH_DTYPES, Piece, Table, TensorEntry, UnsupportedWeights,
                                           WeightFileHeader, read_torch_tensor)

METADATA_FILE = ".metadata"
MODEL_KEY = "model"
"""the key under which accelerate (and torch's examples) save the model's state dict beside others"""


def is_dcp_directory(directory: Path) -> bool:
    return (Path(directory) / METADATA_FILE).is_file()


def read_dcp_headers(directory: str | Path) -> Table:
    """tensor name -> (the header of the data file holding it (its first chunk), its entry); see the module
    docstring. A damaged or truncated checkpoint: UnusableCheckpoint; one that is not read in place:
    UnsupportedWeights; both name the file and the tensor."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    storage_data = {(index.fqn, tuple(index.offset)): info for index, info in metadata.storage_data.items()}
    files: dict[Path, dict[str, TensorEntry]] = {}
    located: dict[str, tuple[Path, TensorEntry]] = {}
    for key, name in _model_names(metadata).items():
        item = metadata.state_dict_metadata[key]
        dtype = item.properties.dtype
        if dtype not in TORCH_DTYPES:
            raise UnsupportedWeights(f"{directory}: tensor {key!r} has dtype torch.{dtype}, which is not supported")
        dtype, shape = TORCH_DTYPES[dtype], tuple(item.size)
        chunks = sorted((chunk for chunk in item.chunks if math.prod(chunk.sizes)), key=lambda c: tuple(c.offsets))
        entries = []
        for chunk in chunks:
            storage = storage_data.get((key, tuple(chunk.offsets)))
            if storage is None:
                raise UnusableCheckpoint(f"{directory / METADATA_FILE}: no data recorded for tensor {key!r} at "
                                         f"{list(chunk.offsets)}")
            path = directory / storage.relative_path
            transforms = getattr(storage, "transform_descriptors", None)  # left out of the pickle when None
            if transforms:
                raise UnsupportedWeights(f"{path}: tensor {key!r} is written through {transforms} (not read in "
                                         f"place; give the run a convert command)")
            if not path.is_file():
                raise UnusableCheckpoint(f"{path}: missing (it holds tensor {key!r})")
            entry = read_torch_tensor(path, storage.offset, storage.length, name)
            if entry.dtype != dtype or entry.shape != tuple(chunk.sizes):
                raise UnusableCheckpoint(f"{path}: tensor {key!r} at byte {storage.offset} is {entry.dtype} "
                                         f"{list(entry.shape)}, {METADATA_FILE} says {dtype} {list(chunk.sizes)}")
            entries.append((path, entry))
        located[name] = _whole(directory, key, name, dtype, shape, chunks, entries)
    for name, (path, entry) in located.items():
        files.setdefault(path, {})[name] = entry
    headers = {path: WeightFileHeader(path, tensors, {}, "dcp") for path, tensors in files.items()}
    return {name: (headers[path], entry) for name, (path, entry) in located.items()}


def dcp_tensor_names(directory: str | Path) -> set[str]:
    """The model's tensor names in a DCP checkpoint, from its ``.metadata`` alone."""
    return set(_model_names(read_metadata(Path(directory))).values())


def _model_names(metadata) -> dict[str, str]:
    """flattened key -> the tensor's name in the model, for every tensor (see the module docstring); values that
    are not tensors (a step counter saved beside the weights) are left out."""
    tensors = [key for key, item in metadata.state_dict_metadata.items() if type(item).__name__ == TENSOR_ITEM]
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    nested = {key for key, path in paths.items()
              if isinstance(path, tuple) and len(path) > 1 and path[0] == MODEL_KEY}
    if not nested:
        return {key: key for key in tensors}
    return {key: ".".join(map(str, paths[key][1:])) for key in tensors if key in nested}


TENSOR_ITEM = "TensorStorageMetadata"
METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.distributed.checkpoint.filesystem",
                                                                   "_StoragePrefix")}
"""the classes torch pickles into ``.metadata`` (``torch/distributed/checkpoint/metadata.py``, ``filesystem.py``)"""


class _Record:
    """A stand-in for one of METADATA_CLASSES: its pickled state as attributes (TensorProperties pickles a
    tuple, ``__getstate__``: dtype first)."""

    def __init__(self, *args) -> None:
        self.args = args

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (__dict__, __slots__) of a slotted dataclass
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.dtype = state[0]


class _MetadataUnpickler(pickle.Unpickler):
    """Reads ``.metadata`` without torch: dtypes become their names, torch.Size a tuple, every metadata class a
    ``_Record`` subclass of its name; any other global is refused."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_CLASSES:
            return self.classes.setdefault(name, type(name, (_Record,), {}))
        if module == "torch" and name == "Size":
            return lambda values=(): tuple(values)
        if module == "torch" and (name in TORCH_DTYPES or name.startswith(("float", "int", "uint", "complex"))):
            return name
        if (module, name) == ("torch.serialization", "_get_layout"):
            return lambda layout: layout
        if (module, name) in (("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")):
            return lambda *parts: "/".join(parts)
        raise pickle.UnpicklingError(f"{module}.{name} is not a name torch writes there")


def read_metadata(directory: Path):
    """The ``Metadata`` of a DCP directory, as ``_Record`` stand-ins; unreadable: an UnusableCheckpoint."""
    path = directory / METADATA_FILE
    try:
        metadata = _MetadataUnpickler(path.read_bytes()).load()
        metadata.state_dict_metadata, metadata.storage_data  # noqa: B018 - what every reader needs
    except OSError as error:
        raise UnusableCheckpoint(f"{path}: cannot read it ({error.strerror})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            RecursionError, OverflowError, struct.error) as error:
        raise UnusableCheckpoint(f"{path}: not a torch.distributed.checkpoint metadata file "
                                 f"({type(error).__name__}: {error})") from None
    metadata.planner_data = getattr(metadata, "planner_data", None)
    return metadata


def _whole(directory: Path, key: str, name: str, dtype: str, shape: tuple[int, ...], chunks: list,
           entries: list[tuple[Path, TensorEntry]]) -> tuple[Path, TensorEntry]:
    """The tensor's entry: its one chunk, or its chunks along the first dimension as pieces."""
    if not entries:
        if math.prod(shape):
            raise UnusableCheckpoint(f"{directory / METADATA_FILE}: tensor {key!r} has no data")
        return directory / METADATA_FILE, TensorEntry(name, dtype, shape, 0, 0)
    if len(entries) == 1 and entries[0][1].shape == shape:
        return entries[0]
    row = math.prod(shape[1:])
    pieces, first = [], 0
    for chunk, (path, entry) in zip(chunks, entries):
        along_rows = all(offset == 0 for offset in chunk.offsets[1:]) and tuple(chunk.sizes[1:]) == shape[1:]
        if not along_rows or entry.strides is not None:
            raise UnsupportedWeights(f"{directory}: tensor {key!r} is saved in chunks of {list(chunk.sizes)} at "
                                     f"{list(chunk.offsets)}, not along its first dimension (not read in place; "
                                     f"give the run a convert command)")
        if chunk.offsets[0] * row != first:
            raise UnusableCheckpoint(f"{directory / METADATA_FILE}: the chunks of tensor {key!r} do not cover it "
                                     f"(a gap or an overlap at row {chunk.offsets[0]})")
        count = math.prod(entry.shape)
        pieces.append(Piece(path, entry.begin, first, count))
        first += count
    if first != math.prod(shape):
        raise UnusableCheckpoint(f"{directory / METADATA_FILE}: the chunks of tensor {key!r} cover {first} of its "
                                 f"{math.prod(shape)} elements")
    head = pieces[0]
    return head.path, TensorEntry(name, dtype, shape, head.begin, head.begin + head.count * DTYPE_SIZES[dtype],
                                  pieces=tuple(pieces))
