"""Inference backends behind one interface (``base.Backend``), chosen by name.

``auto`` takes vLLM when it imports and a GPU is visible, and transformers otherwise. vLLM is imported
only here, on demand, so that CPU installs never need it.
"""

from __future__ import annotations

import importlib.util
import logging

from ckpt_stability.backends.base import Backend
from ckpt_stability.errors import InputError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "transformers", "vllm")
GPU_ENV_HINT = (
    "install the GPU stack: `conda env create -f envs/gpu.yaml` "
    "(or `pip install -e '.[vllm]'` on a machine with CUDA)"
)


def _gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _import_vllm():
    import vllm  # noqa: F401  (the import is the check)


def resolve_backend(name: str) -> str:
    """The backend that ``name`` stands for on this machine; ``auto`` never fails."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    if importlib.util.find_spec("vllm") is None:
        return "transformers"
    if not _gpu_visible():
        log.info("backend auto: no GPU visible, using transformers")
        return "transformers"
    try:
        _import_vllm()
    except Exception as error:  # a broken vLLM install must not stop a run that can go on without it
        log.warning("backend auto: vllm does not import (%s: %s); falling back to transformers",
                    type(error).__name__, error)
        return "transformers"
    return "vllm"


def load_backend(name: str, model_dir: str, *, dtype: str = "auto", batch_size: int = 16,
                 threads: int | None = None, seed: int = 0, add_special_tokens: bool = True) -> Backend:
    resolved = resolve_backend(name)
    if resolved == "vllm":
        try:
            _import_vllm()
        except Exception as error:
            raise InputError(f"backend vllm: vllm does not import ({type(error).__name__}: {error}); "
                             f"{GPU_ENV_HINT}, or set backend: transformers") from None
        from ckpt_stability.backends.vllm import VllmBackend

        return VllmBackend(model_dir, dtype=dtype, seed=seed, add_special_tokens=add_special_tokens)
    from ckpt_stability.backends.transformers import TransformersBackend

    return TransformersBackend(model_dir, dtype=dtype, batch_size=batch_size, threads=threads,
                               add_special_tokens=add_special_tokens)
