"""megatron-core on a CPU-only machine, in one process: a gloo process group of one rank, and the two CUDA calls
that its torch_dist strategy makes unconditionally (``torch.cuda.synchronize`` before writing, and
``torch.cuda.current_device()`` as the device of the failure flag it broadcasts) pointed at the CPU."""

import os
import socket
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def single_process_group() -> None:
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None
        torch.cuda.current_device = lambda: "cpu"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
