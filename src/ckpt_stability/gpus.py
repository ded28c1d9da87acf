"""One GPU per job on a multi-GPU workstation.

Snakemake's ``--resources gpu=N`` keeps at most N GPU jobs running, but does not say which GPU each
one gets. Before anything touches CUDA, a GPU job claims one of the GPUs visible to it with an
exclusive lock file and narrows ``CUDA_VISIBLE_DEVICES`` to that GPU. The lock dies with the process,
crash included. Where a single GPU is visible (a Slurm allocation, or a pinned job) nothing changes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)
_held: list[int] = []  # lock file descriptors, kept open for the life of the process


def visible_gpus() -> list[str]:
    """The GPUs this process may use, without initialising CUDA."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [device for device in listed.split(",") if device.strip() and device.strip() != "-1"]
    try:
        result = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(result.stdout.splitlines()) if line.startswith("GPU ")]


def claim_gpu(lock_dir: str | Path | None = None, poll_seconds: float = 2.0) -> str | None:
    """Claim a free GPU among the visible ones and make it the only one visible; return it."""
    devices = visible_gpus()
    if len(devices) <= 1:
        return devices[0] if devices else None
    lock_dir = Path(lock_dir or Path(tempfile.gettempdir()) / f"ckpt-stability-gpus-{os.getuid()}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for device in devices:
            fd = os.open(lock_dir / f"gpu-{device}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _held.append(fd)
            os.environ["CUDA_VISIBLE_DEVICES"] = device
            log.info("using GPU %s of %s", device, ",".join(devices))
            return device
        # more GPU jobs than GPUs (e.g. --resources gpu larger than the machine has): wait for one
        time.sleep(poll_seconds)
