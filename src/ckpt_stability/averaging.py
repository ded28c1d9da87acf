"""Checkpoint averaging: the mean of the weights of n checkpoints, uniform or weighted by a scheme
(``averaging_schemes``), streamed with bounded memory.

Definition (bit for bit)
------------------------
For every floating-point tensor, with x_1 ... x_n its values in the members in the order given
(oldest first, the last member is the newest), the uniform mean::

    acc  = x_1 + x_2 + ... + x_n    element-wise, summed left to right, in float32
                                    (in float64 when the members store the tensor as float64)
    mean = acc / n                  one IEEE division in the same precision
    out  = mean cast to the output dtype, rounding to nearest, ties to even

and a weighted mean with coefficients c_1 ... c_n (not all equal; computed in float64 by the scheme)::

    acc  = c_1 x_1 + c_2 x_2 + ... + c_n x_n    each c_j rounded to the accumulator's precision, each product
                                                and each sum rounded, left to right, in float32 (float64)
    out  = acc cast to the output dtype, as above (no renormalisation: the c_j sum to 1 in float64)

The output dtype is the members' dtype of that tensor unless ``dtype`` asks for another one; a
float64 mean bound for a narrower dtype is rounded to float32 first, as torch's ``.to()`` does. The
uniform mean is bitwise what torch gives for ``((x_1.float() + ... + x_n.float()) / n).to(out_dtype)``, the
weighted one what it gives for ``(c_1 * x_1.float() + ... + c_n * x_n.float()).to(out_dtype)``, but
it is computed with numpy alone: no torch import, since every workflow job is a fresh process.
Integer and bool tensors (buffers, step counters) are not averaged: they must be identical in every
member and are copied from the newest one.

Members are checkpoint directories in any of the layouts of ``checkpoints.LAYOUTS``, safetensors or
``pytorch_model.bin`` (torch.save zip archives), or torch.distributed checkpoints with Hugging Face names
(``dcp_checkpoints``; their config.json and tokenizer come from ``assets``), mixed as they come: what must
agree is the tensors' names, shapes and dtypes. The output is safetensors whatever the members' format.

Refused, with an InputError naming the arguments: fewer than two members, a member given twice, an
output that holds something else. Refused, with an UnusableCheckpoint naming the checkpoint file and
the tensor: an incomplete member (missing or truncated shard, bad index: see
``checkpoints.checkpoint_problem``) or one in an unsupported format, tensor names, shapes or dtypes
that differ between members, integer tensors that differ, a dtype that cannot be averaged (float8), and
a result that is NaN or infinite (a NaN or Inf in a member, or a mean beyond the range of the output
dtype).

Memory and speed
----------------
Tensors are cut into chunks of ``CHUNK_ELEMENTS`` elements. A chunk is read from each member with
``os.preadv`` into a reused buffer, added into a float32 accumulator, rounded to the output dtype and
written at its final place in the output with ``os.pwrite``. Nothing is memory-mapped: touched mapped
pages count in the RSS for as long as the mapping lives. Peak memory is therefore a few chunk buffers
per thread whatever the size of the model, and checkpoints larger than RAM average fine. Chunks are
processed by a pool of threads (numpy and the ``os`` calls release the GIL); a chunk's buffers are
small enough to stay in the CPU caches between the passes over it.

``.bin`` members are read the same way: torch.save stores every storage uncompressed in its zip
archive, so ``checkpoints`` finds the absolute position of each tensor's bytes from the archive's
records and its pickle (parsed without torch: no torch import here either). The one exception is a
tensor saved as a non-contiguous view (``w.t()`` saved without ``.contiguous()``; transformers never
writes one): it is first rewritten contiguous into an unnamed scratch file in the output's temporary
directory, one tensor at a time, which costs that tensor's size in memory (and on disk) once and a
slower, strided copy, then averaged like the others. A DCP tensor is a ``torch.save`` archive in a data file,
located the same way; one saved by several ranks in row chunks is read piece by piece where each lies.

Output
------
``model.safetensors``, or shards ``model-00001-of-0000N.safetensors`` of at most ``max_shard_size``
bytes (a tensor larger than that gets a shard of its own) with ``model.safetensors.index.json``. The
layout follows from the members' headers alone, so each file's header is written first and the data
streamed after it. Tensors are stored by element size, largest first, then by name, as the
safetensors library does, so that every tensor is aligned to its element size. Every other file of
the newest member (config.json, generation_config.json, the tokenizer files) is copied, except weight
and training-state files (``NOT_COPIED_SUFFIXES``); with ``dtype`` given, the dtype recorded in
config.json is set to it. ``averaging.json`` records the members, their steps, the scheme, the coefficients,
the effective step Σ c_j s_j, the dtype, the tool version and the definition above.

With ``diagnostics``, the relative distances between the members and to the average (``weight_movement``) are
measured on the way, chunk by chunk: each chunk's members are read again, from the page cache, once the chunk's
average is known, and written to that file.

Everything is written into a hidden temporary directory renamed into place at the end
(``atomic.atomic_directory``): a killed job leaves no output that looks complete. An existing output
directory is replaced only when it is empty or holds an average of exactly the same member
directories, per its averaging.json (a rerun, with another dtype for instance; the average is always
recomputed, as the members may have been rewritten since); anything else there is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import struct
import threading
import time
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ckpt_stability import __version__, layout
from ckpt_stability.atomic import atomic_directory
from ckpt_stability.averaging_schemes import Scheme, check_steps, effective_step, is_uniform
from ckpt_stability.checkpoints import INDEX_FILE, SINGLE_FILE, read_checkpoint_headers
from ckpt_stability.dcp_checkpoints import is_dcp_directory
from ckpt_stability.weight_formats import DTYPE_SIZES, Piece, Table
from ckpt_stability.errors import InputError, UnusableCheckpoint
from ckpt_stability.outcomes import check_not_excluded, write_excluded_directory
from ckpt_stability.weight_movement import SquaredSums, write_excluded as write_excluded_distances

log = logging.getLogger(__name__)

UNIFORM_DEFINITION = (
    "uniform mean per floating-point tensor: acc = x_1 + ... + x_n summed left to right in member order "
    "in float32 (float64 for float64 tensors), mean = acc / n, cast to the output dtype rounding to "
    "nearest, ties to even; integer and bool tensors must be identical in all members and are copied "
    "from the newest"
)
WEIGHTED_DEFINITION = (
    "weighted mean per floating-point tensor: acc = c_1 * x_1 + ... + c_n * x_n in member order, each c_j "
    "rounded to float32 (float64 for float64 tensors), each product and each sum rounded, left to right, in that "
    "precision, cast to the output dtype rounding to nearest, ties to even; integer and bool tensors must be "
    "identical in all members and are copied from the newest"
)
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
CHUNK_ELEMENTS = 1 << 18
"""elements per unit of work: large enough to amortise the per-call overhead, small enough that a
chunk's buffers (1 MiB of float32) stay in the CPU caches between the passes over it"""
MAX_THREADS = 8
"""beyond a few threads memory bandwidth, not cores, is the limit"""

OUTPUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
COPIED_DTYPES = {"I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"}
OVERFLOW = {
    "F64": math.inf,
    "F32": math.inf,
    "F16": 65520.0,  # halfway between the largest float16, 65504, and 65536: rounds to infinity
    "BF16": float(np.uint32(0x7F7F8000).view(np.float32)),  # likewise for bfloat16
}
"""the smallest magnitude that the cast to each output dtype rounds to infinity"""
NOT_COPIED_SUFFIXES = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".npy",
                       ".npz", ".h5", ".msgpack", ".gguf")
"""weights and training state (optimizer, scheduler, RNG): they do not describe the average"""



@dataclass(frozen=True)
class _Source:
    path: Path
    """the member's weight file (the one named in messages)"""
    begin: int
    """absolute byte offset of the tensor's data in ``path`` (in the scratch file when ``scratch``)"""
    strides: tuple[int, ...] | None = None
    """a tensor saved as a view: its strides in elements; None: contiguous"""
    scratch: bool = False
    """read from the averager's scratch file, where the strided source was rewritten contiguous"""
    pieces: tuple[Piece, ...] = ()
    """a tensor stored in several files (``weight_formats.TensorEntry.pieces``); empty: at ``begin`` of ``path``"""

    @property
    def paths(self) -> list[Path]:
        return [piece.path for piece in self.pieces] or [self.path]


@dataclass(frozen=True)
class _Tensor:
    """One output tensor: where every member holds it, and where it goes."""

    name: str
    shape: tuple[int, ...]
    in_dtype: str
    out_dtype: str
    sources: tuple[_Source, ...]
    """one per member, oldest first"""
    shard: int
    offset: int
    """absolute byte offset of its data in the output shard"""

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    def position(self, index: int) -> list[int]:
        """The multi-index of flat element ``index``, for messages."""
        return [int(i) for i in np.unravel_index(index, self.shape)] if self.shape else []


@dataclass(frozen=True)
class _Shard:
    name: str
    header: bytes
    """the 8-byte length and the JSON header, padded"""
    size: int
    """bytes of tensor data after the header"""


def average_or_record(members: list[Path], output: Path, *, record_unusable: bool, **options) -> None:
    """``average_checkpoints``; where a member is unusable (non-finite or broken weights) and
    ``record_unusable`` is set, the output directory (and the diagnostics file) holds only the reason
    (``outcomes``) instead."""
    try:
        average_checkpoints(members, output, **options)
    except UnusableCheckpoint as error:
        if not record_unusable:
            raise
        write_excluded_directory(Path(output), f"not built: {error}")
        if options.get("diagnostics") is not None:
            write_excluded_distances(Path(options["diagnostics"]), f"not built: {error}")
        log.warning("%s: not built: %s", output, error)


def average_checkpoints(members: list[Path], output: Path, *, scheme: Scheme = Scheme(), dtype: str | None = None,
                        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, steps: list[int] | None = None,
                        threads: int | None = None, assets: Path | None = None,
                        diagnostics: Path | None = None) -> dict:
    """Write the mean of ``members`` (checkpoint directories, oldest first) weighted by ``scheme`` to ``output``.

    ``steps``: the members' steps, which a scheme other than uniform needs, recorded in averaging.json.
    ``diagnostics``: a file to write the weight distances to (``weight_movement``). ``dtype``: None keeps each
    tensor's dtype, or "float32", "bfloat16", "float16" for every floating-point tensor. ``threads``:
    default, the CPUs this process may run on (at most ``MAX_THREADS``). ``assets``: the directory whose
    config.json and tokenizer go with the weights, for members that hold weights only (torch.distributed
    checkpoints, whose tensor names must be that model's: the workflow checks them when it starts, and
    ``conversion`` for every raw checkpoint); default, the newest member. See the module docstring for the
    definition and the refusals. Returns a summary: tensors, bytes, files, seconds.
    """
    members = [Path(member) for member in members]
    output = Path(output)
    _check_arguments(members, scheme, dtype, max_shard_size, steps)
    _check_output(output, members)
    with atomic_directory(output) as tmp:
        summary = write_mean(members, tmp, scheme=scheme, dtype=dtype, max_shard_size=max_shard_size, steps=steps,
                             threads=threads, assets=assets, measure=diagnostics is not None)
    if diagnostics is not None:
        summary.pop("distances").write(Path(diagnostics))
    log.info("wrote %s", output)
    return {"output": str(output), **summary}


def write_mean(members: list[Path], directory: Path, *, scheme: Scheme = Scheme(), dtype: str | None = None,
               max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, steps: list[int] | None = None,
               threads: int | None = None, assets: Path | None = None, measure: bool = False) -> dict:
    """The mean of ``members`` written into the empty ``directory``, as ``average_checkpoints`` describes; with
    one member, that checkpoint itself in safetensors, bit for bit (how a torch.distributed checkpoint is
    made a Hugging Face directory, ``conversion``). ``measure``: the summary's ``distances`` holds the
    ``weight_movement.WindowDistances``."""
    started = time.perf_counter()
    if assets is None and is_dcp_directory(members[-1]):
        raise InputError(f"{members[-1]}: a torch.distributed checkpoint holds weights only: name the directory of "
                         f"its config.json and tokenizer (--assets)")
    for member in members:
        check_not_excluded(member)  # a checkpoint whose conversion failed: the window is not built
    tables = _match_tied([read_checkpoint_headers(member) for member in members])
    _check_agreement(members, tables)
    tensors, shards = _plan_output(tables, OUTPUT_DTYPES.get(dtype), max_shard_size)
    total = sum(shard.size for shard in shards)
    threads = threads or min(MAX_THREADS, _usable_cpus())
    coefficients = scheme.coefficients(steps if steps is not None else range(len(members)))
    what = f"averaging {len(members)} checkpoints ({members[0]} ... {members[-1]})" if len(members) > 1 else \
        f"writing {members[0]} as safetensors"
    log.info("%s, %s (coefficients %s): %d tensors, %.2f GB out, %d thread(s)", what, scheme.description,
             " ".join(f"{c:.4g}" for c in coefficients), len(tensors), total / 1e9, threads)
    sums = SquaredSums(len(members)) if measure else None
    with threadpool_limits(1, user_api="blas"):  # the distances' dot products: each in its own pool thread
        _Averager(tensors, shards, directory, coefficients, sums).run(threads)
    if len(shards) > 1:
        _write_index(directory / INDEX_FILE, tensors, shards, total)
    _copy_support_files(assets or members[-1], directory, dtype)
    _write_provenance(directory / layout.AVERAGING_PROVENANCE, members, steps, scheme, coefficients, dtype,
                      len(tensors), total)
    seconds = time.perf_counter() - started
    read = len(members) * sum(tensor.count * DTYPE_SIZES[tensor.in_dtype] for tensor in tensors)
    log.info("done in %.1f s (%.2f GB/s read)", seconds, read / max(seconds, 1e-9) / 1e9)
    summary = {"members": len(members), "tensors": len(tensors), "bytes": total,
               "files": [shard.name for shard in shards], "seconds": round(seconds, 3)}
    if sums is not None:
        summary["distances"] = sums.distances(steps if steps is not None else list(range(len(members))))
    return summary


def _usable_cpus() -> int:
    """The CPUs this process may run on (its Slurm or cgroup allocation) where the OS tells."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_arguments(members: list[Path], scheme: Scheme, dtype: str | None, max_shard_size: int,
                     steps: list[int] | None) -> None:
    if steps is not None:
        check_steps(steps)
    elif scheme != Scheme():
        raise InputError(f"scheme {scheme.description}: its coefficients depend on the checkpoints' steps: give them")
    if len(members) < 2:
        raise InputError(f"averaging needs at least 2 checkpoints, got {len(members)}: "
                         f"{', '.join(map(str, members)) or 'none'}")
    seen: dict[Path, Path] = {}
    for member in members:
        resolved = member.resolve()
        if resolved in seen:
            raise InputError(f"{member}: checkpoint given twice (also as {seen[resolved]})")
        seen[resolved] = member
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    if max_shard_size <= 0:
        raise InputError(f"max_shard_size must be positive, got {max_shard_size}")
    if steps is not None and len(steps) != len(members):
        raise InputError(f"{len(steps)} steps ({steps}) given for {len(members)} checkpoints")


def _match_tied(tables: list[Table]) -> list[Table]:
    """Tied weights saved by torch.save are two names on the same bytes (``lm_head.weight`` and the
    embedding, as transformers 4 wrote pytorch_model.bin); safetensors files keep one of them. Where a
    member lacks a name that is such an alias in the newest member, it is read from the member's tensor
    under the other name; an alias the newest member lacks is left out. The output has the newest
    member's names."""
    newest = tables[-1]
    matched = []
    for table in tables[:-1]:
        table = dict(table)
        for name in newest.keys() - table.keys():
            alias = _alias(newest, name)
            if alias is not None and alias in table:
                table[name] = table[alias]
        for name in table.keys() - newest.keys():
            alias = _alias(table, name)
            if alias is not None and alias in newest:
                del table[name]
        matched.append(table)
    return [*matched, newest]


def _alias(table: Table, name: str) -> str | None:
    """Another tensor of ``table`` stored as the very same bytes as ``name``, if any."""
    header, entry = table[name]
    for other, (other_header, other_entry) in table.items():
        if other != name and other_header.path == header.path and (
                other_entry.begin, other_entry.end, other_entry.strides, other_entry.shape, other_entry.dtype) == (
                entry.begin, entry.end, entry.strides, entry.shape, entry.dtype):
            return other
    return None


def _check_agreement(members: list[Path], tables: list[Table]) -> None:
    """Every member holds the newest member's tensors, with the same shapes and dtypes."""
    newest_dir, newest = members[-1], tables[-1]
    for member, table in zip(members[:-1], tables[:-1]):
        missing, extra = sorted(newest.keys() - table.keys()), sorted(table.keys() - newest.keys())
        if missing:
            raise UnusableCheckpoint(f"{member}: tensor {missing[0]!r} is missing{_more(missing)} (the newest "
                                     f"checkpoint {newest_dir} has it)")
        if extra:
            raise UnusableCheckpoint(f"{member}: has tensor {extra[0]!r}{_more(extra)}, which the newest "
                                     f"checkpoint {newest_dir} lacks")
        for name in sorted(table):
            (header, entry), (newest_header, newest_entry) = table[name], newest[name]
            if entry.dtype != newest_entry.dtype:
                raise UnusableCheckpoint(f"{header.path}: tensor {name!r} is {entry.dtype}, but "
                                         f"{newest_entry.dtype} in {newest_header.path}")
            if entry.shape != newest_entry.shape:
                raise UnusableCheckpoint(f"{header.path}: tensor {name!r} has shape {list(entry.shape)}, but "
                                         f"{list(newest_entry.shape)} in {newest_header.path}")
    for name in sorted(newest):
        header, entry = newest[name]
        if entry.dtype not in FLOAT_DTYPES | COPIED_DTYPES:
            raise UnusableCheckpoint(f"{header.path}: tensor {name!r} has dtype {entry.dtype}, which cannot be "
                                     f"averaged")


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _check_output(output: Path, members: list[Path]) -> None:
    """Refuse to replace anything but an empty directory or an average of the same members."""
    if not output.exists():
        return
    if not output.is_dir():
        raise InputError(f"{output}: the output exists and is not a directory")
    if not any(output.iterdir()):
        return
    provenance = output / layout.AVERAGING_PROVENANCE
    try:
        entries = json.loads(provenance.read_text(encoding="utf-8"))["members"]
        recorded = [Path(entry["path"]) for entry in entries]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{output}: already holds something other than an average (no valid "
                         f"{layout.AVERAGING_PROVENANCE}); refusing to overwrite it") from None
    if recorded != [member.resolve() for member in members]:
        raise InputError(f"{output}: already holds the average of other checkpoints "
                         f"({', '.join(map(str, recorded))}); refusing to overwrite it")
    log.info("%s holds an average of the same checkpoints: recomputing it", output)


def _plan_output(tables: list[Table], requested: str | None,
                 max_shard_size: int) -> tuple[list[_Tensor], list[_Shard]]:
    """The output's tensors (in data order) and shards, from the members' headers alone."""
    newest = tables[-1]

    def out_dtype(name: str) -> str:
        dtype = newest[name][1].dtype
        return requested if requested and dtype in FLOAT_DTYPES else dtype

    def nbytes(name: str) -> int:
        return math.prod(newest[name][1].shape) * DTYPE_SIZES[out_dtype(name)]

    order = sorted(newest, key=lambda name: (-DTYPE_SIZES[out_dtype(name)], name))
    groups: list[list[str]] = [[]]
    size = 0
    for name in order:
        if groups[-1] and size + nbytes(name) > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes(name)

    tensors, shards = [], []
    for number, names in enumerate(groups):
        shard_name = (SINGLE_FILE if len(groups) == 1
                      else f"model-{number + 1:05d}-of-{len(groups):05d}.safetensors")
        header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        begin = 0
        for name in names:
            shape = newest[name][1].shape
            header[name] = {"dtype": out_dtype(name), "shape": list(shape),
                            "data_offsets": [begin, begin + nbytes(name)]}
            begin += nbytes(name)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # like safetensors: the data starts 8-byte aligned
        shards.append(_Shard(shard_name, struct.pack("<Q", len(text)) + text, begin))
        data_start = 8 + len(text)
        for name in names:
            entries = [table[name][1] for table in tables]
            tensors.append(_Tensor(
                name=name, shape=entries[-1].shape, in_dtype=entries[-1].dtype, out_dtype=out_dtype(name),
                sources=tuple(_Source(table[name][0].path, entry.begin, entry.strides, pieces=entry.pieces)
                              for table, entry in zip(tables, entries)),
                shard=number, offset=data_start + header[name]["data_offsets"][0],
            ))
    return tensors, shards


class _Scratch:
    """One thread's buffers, allocated once; a chunk of any dtype fits in each."""

    def __init__(self) -> None:
        size = CHUNK_ELEMENTS * 8
        self.raw, self.other, self.acc, self.wide, self.bits, self.out = (
            np.empty(size, np.uint8) for _ in range(6))
        self._measuring: list[np.ndarray] | None = None

    def measuring(self, count: int) -> list[np.ndarray]:
        """Four float64 buffers of ``count`` elements for the weight distances (made on first use): the average,
        a member, the previous member, a difference."""
        if self._measuring is None:
            self._measuring = [np.empty(CHUNK_ELEMENTS, np.float64) for _ in range(4)]
        return [buffer[:count] for buffer in self._measuring]


class _Averager:
    """Reads, averages and writes the chunks of every tensor on a pool of threads; with ``sums``, measures the
    members' distances on the way (``weight_movement``)."""

    def __init__(self, tensors: list[_Tensor], shards: list[_Shard], directory: Path, coefficients: list[float],
                 sums: SquaredSums | None = None) -> None:
        self.tensors = list(tensors)
        self.shards = shards
        self.directory = directory
        self.uniform = is_uniform(coefficients)
        self.coefficients = {np.float32: np.array(coefficients, np.float32),
                             np.float64: np.array(coefficients, np.float64)}
        self.sums = sums
        self.inputs: dict[Path, int] = {}
        self.outputs: list[int] = []
        self.scratch = None
        self.local = threading.local()

    def run(self, threads: int) -> None:
        try:
            for tensor in self.tensors:
                for path in {path for source in tensor.sources for path in source.paths}:
                    if path not in self.inputs:
                        self.inputs[path] = os.open(path, os.O_RDONLY)
            self._make_contiguous()
            for shard in self.shards:
                fd = os.open(self.directory / shard.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self.outputs.append(fd)
                _write(fd, shard.header, 0)
            pool = ThreadPoolExecutor(threads, thread_name_prefix="average")
            pending: deque[Future] = deque()
            try:
                # a bounded queue of chunks, waited for in data order: the error reported is the first
                # one in data order, and a model of a million chunks does not make a million futures
                # (the distances' sums are added in that order too: the same figures in every run)
                for tensor in self.tensors:
                    for start in range(0, tensor.count, CHUNK_ELEMENTS):
                        if len(pending) == 4 * threads:
                            self._collect(*pending.popleft())
                        stop = min(start + CHUNK_ELEMENTS, tensor.count)
                        pending.append((tensor, pool.submit(self._process, tensor, start, stop)))
                while pending:
                    self._collect(*pending.popleft())
            finally:
                pool.shutdown(cancel_futures=True)
        finally:
            for fd in [*self.inputs.values(), *self.outputs]:
                os.close(fd)
            if self.scratch is not None:
                self.scratch.close()

    def _make_contiguous(self) -> None:
        """Rewrite every strided source (a .bin tensor saved as a view) contiguous into an unnamed scratch
        file beside the output, and read it from there: the chunks then need no gathering. Memory: the
        tensor's extent in its storage, once, plus a chunk."""
        written: dict[tuple, int] = {}
        end = 0
        for number, tensor in enumerate(self.tensors):
            if all(source.strides is None for source in tensor.sources):
                continue
            if self.scratch is None:
                self.scratch = tempfile.TemporaryFile(dir=self.directory)
            sources = list(tensor.sources)
            for member, source in enumerate(sources):
                if source.strides is None:
                    continue
                key = (source.path, source.begin, source.strides, tensor.shape, tensor.in_dtype)
                if key not in written:
                    written[key] = end
                    self._write_contiguous(tensor, source, end)
                    end += tensor.count * DTYPE_SIZES[tensor.in_dtype]
                sources[member] = _Source(source.path, written[key], scratch=True)
            self.tensors[number] = replace(tensor, sources=tuple(sources))

    def _write_contiguous(self, tensor: _Tensor, source: _Source, offset: int) -> None:
        size = DTYPE_SIZES[tensor.in_dtype]
        unit = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[size]
        extent = 1 + sum((dim - 1) * stride for dim, stride in zip(tensor.shape, source.strides))
        span = np.empty(extent, unit)
        _read_exactly(self.inputs[source.path], span.view(np.uint8), source.begin, source.path, tensor.name)
        view = np.lib.stride_tricks.as_strided(span, tensor.shape, [stride * size for stride in source.strides],
                                               writeable=False)
        row = math.prod(tensor.shape[1:])
        block = max(1, CHUNK_ELEMENTS // max(row, 1))
        for start in range(0, tensor.shape[0], block):
            _write(self.scratch.fileno(), np.ascontiguousarray(view[start:start + block]),
                   offset + start * row * size)

    def _collect(self, tensor: _Tensor, chunk: Future) -> None:
        """Wait for a chunk; add its distances' sums, if any."""
        sums = chunk.result()
        if sums is not None:
            self.sums.add(tensor.name, sums)

    def _process(self, tensor: _Tensor, start: int, stop: int) -> np.ndarray | None:
        """Average (or copy) one chunk and write it; the chunk's distances' sums when measuring a float tensor."""
        scratch = getattr(self.local, "scratch", None)
        if scratch is None:
            scratch = self.local.scratch = _Scratch()
        sums = None
        if tensor.in_dtype in FLOAT_DTYPES:
            with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is refused below
                data, sums = self._average_chunk(tensor, start, stop, scratch)
        else:
            data = self._copy_chunk(tensor, start, stop, scratch)
        _write(self.outputs[tensor.shard], data, tensor.offset + start * DTYPE_SIZES[tensor.out_dtype])
        return sums

    def _average_chunk(self, tensor: _Tensor, start: int, stop: int,
                       scratch: _Scratch) -> tuple[np.ndarray, np.ndarray | None]:
        count = stop - start
        acc_dtype = np.float64 if tensor.in_dtype == "F64" else np.float32
        acc = scratch.acc[: count * np.dtype(acc_dtype).itemsize].view(acc_dtype)
        weights = self.coefficients[acc_dtype]
        for member in range(len(tensor.sources)):
            values = _widen(self._read(tensor, member, start, stop, scratch.raw), tensor.in_dtype, scratch.wide)
            if self.uniform:
                np.copyto(acc, values) if member == 0 else np.add(acc, values, out=acc)
            elif member == 0:
                np.multiply(values, weights[0], out=acc)
            else:
                np.add(acc, np.multiply(values, weights[member], out=values), out=acc)  # values: scratch
        if self.uniform:
            np.divide(acc, acc_dtype(len(tensor.sources)), out=acc)
        mean = acc
        if acc_dtype is np.float64 and tensor.out_dtype != "F64":
            mean = scratch.wide[: count * 4].view(np.float32)
            np.copyto(mean, acc, casting="same_kind")
        limit = OVERFLOW[tensor.out_dtype]
        # min and max propagate NaN, so this one test catches NaN, Inf and overflow in the cast
        if not (-limit < mean.min() and mean.max() < limit):
            self._refuse_non_finite(tensor, start, mean, limit)
        sums = None if self.sums is None else self._measure(tensor, start, stop, acc, scratch)
        return _narrow(mean, tensor.out_dtype, scratch.out, scratch.bits), sums

    def _measure(self, tensor: _Tensor, start: int, stop: int, average: np.ndarray, scratch: _Scratch) -> np.ndarray:
        """The chunk's squared sums in the order of ``weight_movement.SquaredSums.size``: each member's norm, its
        distance to the previous member and to ``average`` (the chunk's average, in the accumulator's dtype), and
        the average's norm. Differences and sums in float64: a difference of two float32 values is exact there."""
        n = len(tensor.sources)
        sums = np.empty(SquaredSums.size(n))
        average64, current, previous, difference = scratch.measuring(stop - start)
        np.copyto(average64, average)
        sums[-1] = np.dot(average64, average64)
        for member in range(n):
            np.copyto(current, _widen(self._read(tensor, member, start, stop, scratch.raw), tensor.in_dtype,
                                      scratch.wide))
            sums[member] = np.dot(current, current)
            np.subtract(current, average64, out=difference)
            sums[2 * n - 1 + member] = np.dot(difference, difference)
            if member > 0:
                np.subtract(current, previous, out=difference)
                sums[n + member - 1] = np.dot(difference, difference)
            current, previous = previous, current
        return sums

    def _copy_chunk(self, tensor: _Tensor, start: int, stop: int, scratch: _Scratch) -> np.ndarray:
        newest = self._read(tensor, len(tensor.sources) - 1, start, stop, scratch.raw)
        for member in range(len(tensor.sources) - 1):
            other = self._read(tensor, member, start, stop, scratch.other)
            if not np.array_equal(other, newest):
                index = start + int(np.flatnonzero(other != newest)[0]) // DTYPE_SIZES[tensor.in_dtype]
                raise UnusableCheckpoint(
                    f"{tensor.sources[member].path}: {tensor.in_dtype} tensor {tensor.name!r} differs at "
                    f"{tensor.position(index)} from the newest checkpoint's ({tensor.sources[-1].path}); "
                    f"integer and bool tensors are copied, not averaged, and must agree")
        return newest

    def _read(self, tensor: _Tensor, member: int, start: int, stop: int, buffer: np.ndarray) -> np.ndarray:
        """Elements [start, stop) of ``tensor`` in ``member``, as raw bytes in ``buffer``."""
        size = DTYPE_SIZES[tensor.in_dtype]
        source = tensor.sources[member]
        view = buffer[: (stop - start) * size]
        if not source.pieces:
            fd = self.scratch.fileno() if source.scratch else self.inputs[source.path]
            _read_exactly(fd, view, source.begin + start * size, source.path, tensor.name)
        for piece in source.pieces:  # the pieces that overlap [start, stop)
            low, high = max(start, piece.first), min(stop, piece.first + piece.count)
            if low < high:
                _read_exactly(self.inputs[piece.path], view[(low - start) * size:(high - start) * size],
                              piece.begin + (low - piece.first) * size, piece.path, tensor.name)
        return view

    def _refuse_non_finite(self, tensor: _Tensor, start: int, mean: np.ndarray, limit: float) -> None:
        index = start + int(np.flatnonzero(~(np.abs(mean) < limit))[0])
        position = tensor.position(index)
        values = [_widen(self._read(tensor, member, index, index + 1, np.empty(8, np.uint8)),
                         tensor.in_dtype, np.empty(8, np.uint8))[0]
                  for member in range(len(tensor.sources))]
        for source, value in zip(tensor.sources, values):
            if not np.isfinite(value):
                raise UnusableCheckpoint(f"{source.path}: tensor {tensor.name!r} holds {value} at {position}, "
                                         f"which makes the average non-finite")
        paths = ", ".join(str(source.path) for source in tensor.sources)
        raise UnusableCheckpoint(f"tensor {tensor.name!r}: the mean at {position} of the values "
                                 f"{[float(value) for value in values]} in {paths} is "
                                 f"{float(mean[index - start])}, beyond the range of {tensor.out_dtype}")


def _read_exactly(fd: int, view: np.ndarray, offset: int, path: Path, name: str) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; ``path`` and ``name`` (the file and tensor) for the message."""
    done = 0
    while done < view.size:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise InputError(f"{path}: the file ends within tensor {name!r} (truncated while being read?)")
        done += got


def _widen(raw: np.ndarray, dtype: str, scratch: np.ndarray) -> np.ndarray:
    """The bytes ``raw`` of ``dtype`` as values of the accumulator's dtype (float32 or float64)."""
    if dtype == "F64":
        return raw.view(np.float64)
    if dtype == "F32":
        return raw.view(np.float32)
    wide = scratch[: raw.size * 2].view(np.float32)
    if dtype == "F16":
        np.copyto(wide, raw.view(np.float16))
    else:  # BF16 is the high half of a float32
        np.left_shift(raw.view(np.uint16), np.uint32(16), out=wide.view(np.uint32), dtype=np.uint32)
    return wide


def _narrow(mean: np.ndarray, dtype: str, out: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """``mean`` (float64 for F64, float32 otherwise) rounded to ``dtype``, nearest even, as bytes."""
    if dtype in ("F32", "F64"):
        return mean.view(np.uint8)
    result = out[: mean.size * 2].view(np.float16 if dtype == "F16" else np.uint16)
    if dtype == "F16":
        np.copyto(result, mean, casting="same_kind")
    else:
        # BF16: add 0x7FFF plus the lowest kept bit, then drop the 16 low bits. No overflow: NaN and
        # Inf, the only patterns that could wrap around, were refused before.
        word, rounded = mean.view(np.uint32), bits[: mean.size * 4].view(np.uint32)
        np.right_shift(word, 16, out=rounded)
        np.bitwise_and(rounded, 1, out=rounded)
        np.add(rounded, 0x7FFF, out=rounded)
        np.add(rounded, word, out=rounded)
        np.right_shift(rounded, 16, out=rounded)
        np.copyto(result, rounded, casting="unsafe")
    return result.view(np.uint8)


def _write(fd: int, data: bytes | np.ndarray, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _write_index(path: Path, tensors: list[_Tensor], shards: list[_Shard], total: int) -> None:
    weight_map = {tensor.name: shards[tensor.shard].name for tensor in sorted(tensors, key=lambda t: t.name)}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _copy_support_files(newest: Path, target: Path, dtype: str | None) -> None:
    """Copy the newest member's config, tokenizer and other files; not weights or training state."""
    for source in sorted(newest.iterdir()):
        skipped = source.name == layout.AVERAGING_PROVENANCE or source.name.endswith(NOT_COPIED_SUFFIXES)
        if source.is_file() and not skipped:
            shutil.copyfile(source, target / source.name)
    config_path = target / "config.json"
    if dtype is not None:
        # the stored dtype is what from_pretrained(dtype="auto") and vLLM load the weights as
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for key in [key for key in ("dtype", "torch_dtype") if key in config] or ["dtype"]:
            config[key] = dtype
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_provenance(path: Path, members: list[Path], steps: list[int] | None, scheme: Scheme,
                      coefficients: list[float], dtype: str | None, tensors: int, total: int) -> None:
    provenance = {
        "tool": "ckpt-stability average",
        "version": __version__,
        "definition": UNIFORM_DEFINITION if is_uniform(coefficients) else WEIGHTED_DEFINITION,
        "scheme": {key: value for key, value in dataclasses.asdict(scheme).items() if value is not None},
        "members": [{"path": str(member.resolve()), "step": None if steps is None else steps[number],
                     "coefficient": coefficient}
                    for number, (member, coefficient) in enumerate(zip(members, coefficients))],
        "effective_step": None if steps is None else effective_step(steps, coefficients),
        "dtype": dtype,
        "tensors": tensors,
        "bytes": total,
    }
    path.write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
