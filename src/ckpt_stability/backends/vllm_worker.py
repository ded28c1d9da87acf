"""What the weight swap runs inside vLLM's worker (``LLM(worker_extension_cls=...)``, called by name through
``collective_rpc``: nothing is pickled, so it works with vLLM's worker processes as well as in process).

* ``repack_shared_layers``: vLLM's ``reload_weights`` re-runs a layer's post-load processing
  (``quant_method.process_weights_after_loading``) only for the layers whose weights it read. An output
  layer tied to the embeddings reads none (its weight *is* the embedding's, which the embedding layer
  loaded): vLLM logs "ParallelLMHead: Failed to load weights" and keeps the layer's processed state from
  the old weights. On the CPU that state is the copy its matmul runs on (``dispatch_cpu_unquantized_gemm``
  prepacks it), so a swapped model scored with the old output layer while its parameters, and so vLLM's
  checksums, were the new ones. Re-running the processing of every layer that shares a weight with
  another module rebuilds that copy from the new weights (on a GPU it does nothing for unquantized layers).
* ``weight_fingerprints``: what the swap's guard compares before and after: a fingerprint of every
  parameter that holds values (the CPU's matmul layers keep an empty placeholder instead, equal for every
  checkpoint), and of every matmul layer's output on a fixed input, computed by the layer's own kernel,
  so through the weights it really uses (its prepacked copy on the CPU). Fingerprints are sums of the bit
  patterns, computed on the device: exact for equal bytes, and a change that leaves one equal can only
  refuse a swap, never accept a wrong one.
"""

from __future__ import annotations

import torch

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PROBE_ROWS = 2


def _bit_sum(tensor: torch.Tensor) -> int:
    return int(tensor.detach().view(_BITS[tensor.element_size()]).sum(dtype=torch.int64))


def _matmul_input_size(module: torch.nn.Module) -> int | None:
    """How many features a matmul layer takes (a linear layer, the output layer or the embeddings, whose
    method multiplies by the weight as the output layer does); None for any other module."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    if isinstance(module, LinearBase):
        return module.input_size_per_partition
    if isinstance(module, VocabParallelEmbedding):
        return module.embedding_dim
    return None


class CheckpointSwap:
    """Mixed into vLLM's worker class: ``self`` is the worker."""

    def repack_shared_layers(self) -> list[str]:
        """Re-run the post-load processing of every layer whose weight another module shares; their names."""
        model = self.model_runner.get_model()
        owners: dict[int, list[tuple[str, torch.nn.Module]]] = {}
        for name, module in model.named_modules():
            for parameter in module.parameters(recurse=False):
                owners.setdefault(id(parameter), []).append((name, module))
        repacked = []
        for shared in (modules for modules in owners.values() if len(modules) > 1):
            for name, module in shared:
                method = getattr(module, "quant_method", None)
                if method is not None and hasattr(method, "process_weights_after_loading"):
                    method.process_weights_after_loading(module)
                    repacked.append(name)
        return repacked

    @torch.no_grad()
    def weight_fingerprints(self) -> dict[str, int]:
        """``param:NAME`` for each parameter with values, ``output:NAME`` for each matmul layer's output on a
        fixed input (see the module's docstring)."""
        model = self.model_runner.get_model()
        dtype = self.model_config.dtype
        fingerprints = {f"param:{name}": _bit_sum(parameter) for name, parameter in model.named_parameters()
                        if parameter.numel()}
        generator = torch.Generator().manual_seed(0)
        for name, module in model.named_modules():
            method, size = getattr(module, "quant_method", None), _matmul_input_size(module)
            if method is None or not size:
                continue
            device = next(module.parameters()).device
            probe = torch.randn(_PROBE_ROWS, size, generator=generator).to(device=device, dtype=dtype)
            fingerprints[f"output:{name}"] = _bit_sum(method.apply(module, probe))
        return fingerprints
