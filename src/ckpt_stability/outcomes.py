"""Models that cannot be evaluated: how the workflow records them instead of failing.

A checkpoint that is unusable for a reason of its own (``errors.UnusableCheckpoint``: non-finite
weights, a corrupt or unsupported weight file, a model that does not load) must not take the other
models down. The jobs that meet one write their outputs all the same, holding the reason:

* ``average``: the output directory holds only ``excluded.json`` (``{"excluded": reason}``);
* ``evaluate``: every task's prediction file has no rows and the reason in its provenance, and the
  perplexity file holds the reason instead of numbers;
* ``ensemble``: likewise, when a member of the window was excluded.

The reductions then leave those models out and list them with their reasons. Transient failures (a
killed job, out of memory, a full disk) are never recorded: they fail the job, and a rerun retries it.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

from ckpt_stability import layout
from ckpt_stability.atomic import atomic_directory, write_text
from ckpt_stability.errors import UnusableCheckpoint

EXCLUDED_FILE = "excluded.json"
EXCLUDED_KEY = "excluded"


def write_excluded_directory(output: Path, reason: str) -> None:
    """An averaged model's directory that says why the average was not built."""
    with atomic_directory(output) as directory:
        write_text(directory / EXCLUDED_FILE, json.dumps({EXCLUDED_KEY: reason}, ensure_ascii=False, indent=1) + "\n")


def check_not_excluded(model_dir: Path) -> None:
    """Raise UnusableCheckpoint with the recorded reason when ``model_dir`` is an average that was not built."""
    marker = Path(model_dir) / EXCLUDED_FILE
    if marker.is_file():
        raise UnusableCheckpoint(json.loads(marker.read_text(encoding="utf-8"))[EXCLUDED_KEY])


def check_usable(model_dir: Path) -> None:
    """Refuse, before loading it, a model that is unusable for a reason of its own (UnusableCheckpoint): an
    average that was not built (its recorded reason), a broken checkpoint (``checkpoints.check_model_dir``),
    non-finite weights (``check_finite``)."""
    from ckpt_stability.checkpoints import check_model_dir

    check_not_excluded(model_dir)
    check_model_dir(model_dir)
    check_finite(model_dir)


TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.ENOMEM, errno.EIO, errno.EDQUOT, errno.EINTR, errno.ESTALE})


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the process or its GPU ran out of memory (torch raises a RuntimeError, or its
    OutOfMemoryError subclass, whose message says so; vLLM a ValueError when the GPU's free memory is
    short of what it wants at start, e.g. while another process still lets go of it)."""
    message = str(error).lower()
    return (isinstance(error, MemoryError) or "out of memory" in message or "can't allocate" in message
            or "less than desired gpu memory utilization" in message)


def loading_failure(error: Exception, model_dir: Path) -> UnusableCheckpoint | None:
    """The UnusableCheckpoint that a library's error while loading ``model_dir`` stands for, or None when the
    error is transient (out of memory, a full disk, an I/O error) and must fail the job."""
    message = str(error).splitlines()[0] if str(error) else ""
    if is_out_of_memory(error):
        return None
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return None
    return UnusableCheckpoint(f"{model_dir}: the model does not load ({type(error).__name__}: {message})")


def check_finite(model_dir: Path) -> None:
    """Refuse a checkpoint that holds a NaN or an infinity, naming the file, the tensor and the position:
    its scores would be garbage. Every weight file is read once, tensor by tensor (memory: the largest
    tensor). Averages are skipped: averaging refuses a non-finite mean as it computes it."""
    import torch

    from ckpt_stability.checkpoints import iter_tensors, weight_files

    if (Path(model_dir) / layout.AVERAGING_PROVENANCE).is_file():
        return
    for path in weight_files(model_dir):
        for name, tensor in iter_tensors(path):
            if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                continue
            finite = torch.isfinite(tensor)
            if not finite.all():
                position = [int(i) for i in (~finite).nonzero()[0]]
                value = tensor[tuple(position)].item()
                raise UnusableCheckpoint(f"{path}: tensor {name!r} holds {value} at {position}: non-finite weights "
                                         f"(a diverged checkpoint)")

