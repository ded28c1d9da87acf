"""The vLLM backend: offline ``vllm.LLM`` on a GPU, one model per process.

* ``generate``: greedy decoding (``temperature=0``) with the stop strings; the few-shot prefix shared by
  a task's prompts is served from vLLM's prefix cache.
* ``choice``: prompt log-probabilities of ``tokenize(prompt + choice)``; the choice's tokens are those past
  ``tokenize(prompt)``, as in the transformers backend. These requests never read the prefix cache: a
  cached prefix has no logits, so vLLM (V1) recomputes requests that ask for prompt log-probabilities,
  and they say so explicitly here where the installed vLLM knows the option.
* The torch.compile cache is shared by all checkpoints of one architecture: vLLM keys its cache by the
  model path among others, so every checkpoint would compile anew; here the directory is keyed by the
  architecture (config.json without paths), the dtype and the library versions instead.
* ``swap_weights`` reloads another checkpoint into the running engine with vLLM's supported API
  (``collective_rpc("reload_weights")``, in place: CUDA graphs and compiled code stay valid), then resets
  the prefix cache, which would otherwise serve keys and values computed with the old weights. Each swap
  costs one pass of vLLM's weight checksums (``compute_weight_checksums``: the weights copied to the host
  and hashed), the price of knowing that every layer was reloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ckpt_stability.backends.base import (Backend, WeightsNotSwappable, continuation_split, cut_at_stop,
                                          inference_dtype)
from ckpt_stability.checkpoints import architecture, read_checkpoint_headers, read_config, weight_files

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


class VllmBackend(Backend):
    name = "vllm"

    def __init__(self, model_dir: str, *, dtype: str = "auto", seed: int = 0, add_special_tokens: bool = True,
                 **engine_options):
        from vllm import LLM

        dtype = inference_dtype(dtype, True, model_dir)
        self.llm = LLM(
            model=model_dir,
            dtype=dtype,
            seed=seed,
            enable_prefix_caching=True,
            compilation_config={"cache_dir": str(compile_cache_dir(model_dir, dtype))},
            **engine_options,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.add_special_tokens = add_special_tokens
        # vLLM refuses a prompt of max_model_len tokens: a prompt and at least one output token must fit
        self.context_length = self.llm.llm_engine.model_config.max_model_len - 1
        self.model_dir = model_dir
        self._tensor_table = tensor_table(model_dir)
        self._weight_files = weight_file_stamps(model_dir)
        self._loaded_checksums: dict[str, str] | None = None  # taken at the first swap

    def _checksums(self) -> dict[str, str]:
        """SHA-256 of every parameter on the GPU, by vLLM's name (its fused qkv_proj, gate_up_proj)."""
        (checksums,) = self.llm.collective_rpc("compute_weight_checksums")  # one worker: no tensor parallelism
        return {name.rsplit(":", 1)[-1]: digest for name, digest in checksums.items()}

    def swap_weights(self, model_dir: str) -> None:
        """Reload ``model_dir`` into the running engine.

        vLLM only logs a layer that the new checkpoint lacks, and leaves its old weights in place: the
        checkpoint must hold the same tensors as the loaded one (names, dtypes, shapes, from its files'
        headers). After the reload every parameter must have new bytes (vLLM's own checksums, before and
        after): one that kept its bytes is taken for a layer that was not reloaded, and the engine is built
        anew, which costs a start where two checkpoints share a tensor, never a wrong score. Any failure
        is WeightsNotSwappable: the engine is then built anew."""
        files = weight_file_stamps(model_dir)
        if files == self._weight_files:
            return  # the same weights again (a retried job): nothing to reload
        table = tensor_table(model_dir)
        if table != self._tensor_table:
            differing = sorted(set(table.items()) ^ set(self._tensor_table.items()))
            raise WeightsNotSwappable(f"{model_dir} does not hold the same tensors as {self.model_dir} "
                                      f"(e.g. {differing[0][0]!r})")
        try:
            before = self._loaded_checksums or self._checksums()
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_dir, "is_checkpoint_format": True})
            reset = self.llm.reset_prefix_cache()
            after = self._checksums()
        except Exception as error:
            raise WeightsNotSwappable(f"vLLM's reload failed ({type(error).__name__}: {error})") from None
        if not reset:
            raise WeightsNotSwappable("vLLM did not reset its prefix cache after the reload")
        kept = sorted(name for name, digest in after.items() if before.get(name) == digest)
        if kept:
            raise WeightsNotSwappable(f"{len(kept)} parameter(s) kept their bytes after the reload of {model_dir} "
                                      f"(e.g. {kept[0]!r})")
        self.model_dir, self._weight_files, self._loaded_checksums = model_dir, files, after

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
            "device": torch.cuda.get_device_name(),
            "dtype": str(self.llm.llm_engine.model_config.dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "vllm": vllm.__version__,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def close(self) -> None:
        """Shut the engine core down and free the GPU before returning: the next engine of this GPU (a new
        backend here, or a new engine process) needs its memory."""
        import gc

        import torch

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        torch.cuda.empty_cache()
