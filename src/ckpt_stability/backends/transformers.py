"""The transformers backend: batched inference on the CPU or a GPU, the fallback everywhere.

``choice`` scoring runs what all of a task's prompts share (header and few-shot examples) once, then
each example's own part once on top of that key/value cache, then its choices together on top of
that: a prompt costs one forward pass over its own tokens however many choices it has.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ckpt_stability.backends.base import (Backend, WeightsNotSwappable, continuation_split, cut_at_stop,
                                          inference_dtype)
from ckpt_stability.errors import InputError


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all the sequences share (``commonprefix`` compares any sequences item by
    item, through the lexicographically smallest and largest only)."""
    return len(os.path.commonprefix(list(sequences)))


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' progress bars ("Loading weights", "Writing model shards") off for the block: in a job's
    log they are carriage-return noise. The previous setting is restored afterwards."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def cache_argument(model) -> str:
    """The name under which the model's ``forward`` takes a key/value cache, and its output returns it:
    ``cache`` in current transformers (5.24; there ``past_key_values`` still works, with a FutureWarning,
    until 5.40), ``past_key_values`` in older ones (5.20.2, the GPU env's, has no ``cache``: it would take
    ``cache=`` into ``**kwargs`` and silently run without the cache)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TransformersBackend(Backend):
    name = "transformers"

    def __init__(self, model_dir: str, *, dtype: str = "auto", batch_size: int = 16, threads: int | None = None,
                 device: str | None = None, add_special_tokens: bool = True):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.add_special_tokens = add_special_tokens
        self.torch_dtype = getattr(torch, inference_dtype(dtype, self.device != "cpu", model_dir))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        with no_progress_bars():
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.torch_dtype).to(self.device).eval()
        self.cache_argument = cache_argument(self.model)
        config = self.model.config
        context_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if not context_length:
            raise InputError(f"{model_dir}/config.json: no max_position_embeddings (or n_positions): "
                             f"the model's context length is unknown")
        self.context_length = int(context_length)

    def _batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Indices in batches of similar length (longest first), to waste little on padding."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        for start in range(0, len(order), self.batch_size):
            yield order[start:start + self.batch_size]

    def _forward_cached(self, cache, **inputs) -> tuple[torch.Tensor, object]:
        """A forward pass on top of ``cache`` (None: none yet): its logits and the cache extended by its
        tokens."""
        output = self.model(**inputs, use_cache=True, **{self.cache_argument: cache})
        return output.logits, getattr(output, self.cache_argument)

    def _pad(self, sequences: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of a batch, padded on the left (prompts to continue) or on the
        right (continuations of a cached prefix, texts to score)."""
        width = max(map(len, sequences))
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            columns = slice(width - len(sequence), width) if left else slice(0, len(sequence))
            ids[row, columns] = torch.tensor(sequence)
            mask[row, columns] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str]) -> list[str]:
        from transformers import GenerationConfig

        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            pad_token_id=self.pad_id, eos_token_id=self.tokenizer.eos_token_id,
        )
        encoded = self.encode(prompts)
        outputs: list[str] = [""] * len(prompts)
        for batch in self._batches([len(ids) for ids in encoded]):
            ids, mask = self._pad([encoded[i] for i in batch], left=True)
            generated = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            texts = self.tokenizer.batch_decode(generated[:, ids.shape[1]:], skip_special_tokens=True)
            for index, text in zip(batch, texts):
                outputs[index] = cut_at_stop(text, stop)
        return outputs

    @torch.inference_mode()
    def choice_logprobs(self, prompts: Sequence[str], choices: Sequence[str]) -> np.ndarray:
        prompt_ids = self.encode(prompts)
        whole_ids = self.encode([prompt + choice for prompt in prompts for choice in choices])
        n_choices = len(choices)
        wholes = [whole_ids[i * n_choices:(i + 1) * n_choices] for i in range(len(prompts))]
        starts = [[continuation_split(prompt_ids[i], whole) for whole in example] for i, example in enumerate(wholes)]
        # an example's prefix: what its choices share, up to its first scored token
        prefix_lengths = [max(1, min(common_prefix_length(example), min(example_starts)))
                          for example, example_starts in zip(wholes, starts)]
        # the task's prefix (header and few-shot examples): what every prompt shares, run once for all;
        # each example keeps at least one token of its own, whose logits score its choices' first token
        shared = min(common_prefix_length([example[0] for example in wholes]), min(prefix_lengths) - 1)
        shared_cache = None
        if shared > 0:
            shared_ids = torch.tensor([wholes[0][0][:shared]], device=self.device)
            _, shared_cache = self._forward_cached(None, input_ids=shared_ids, logits_to_keep=1)
        result = np.zeros((len(prompts), n_choices))
        for batch in self._batches(prefix_lengths):
            scores = self._score_on_shared_prefix([wholes[i] for i in batch], [starts[i] for i in batch],
                                                  [prefix_lengths[i] for i in batch], shared, shared_cache)
            for row, index in enumerate(batch):
                result[index] = scores[row]
        return result

    def _score_on_shared_prefix(self, wholes: list[list[list[int]]], starts: list[list[int]],
                                prefix_lengths: list[int], shared: int, shared_cache) -> np.ndarray:
        """Score ``whole[start:]`` for every (example, choice), running each example's prefix once.

        The first ``shared`` tokens (common to every example) are in ``shared_cache`` already. The rest of
        each example's prefix runs on top of it (left-padded across the batch); that cache is repeated
        for each choice, and the choices' remaining tokens run on top of it (right-padded)."""
        n_examples, n_choices = len(wholes), len(wholes[0])
        query_ids, query_mask = self._pad([example[0][shared:p] for example, p in zip(wholes, prefix_lengths)],
                                          left=True)
        cache = None
        if shared_cache is not None:
            cache = copy.deepcopy(shared_cache)
            cache.batch_repeat_interleave(n_examples)
        prefix_mask = torch.cat([torch.ones((n_examples, shared), dtype=torch.long, device=self.device),
                                 query_mask], dim=1)
        query_positions = shared + (query_mask.cumsum(-1) - 1).clamp(min=0)
        prefix_logits, cache = self._forward_cached(cache, input_ids=query_ids, attention_mask=prefix_mask,
                                                    position_ids=query_positions, logits_to_keep=1)
        last_logprobs = torch.log_softmax(prefix_logits[:, -1, :].float(), dim=-1)
        cache.batch_repeat_interleave(n_choices)

        suffixes = [whole[p:] for example, p in zip(wholes, prefix_lengths) for whole in example]
        suffix_ids, suffix_mask = self._pad(suffixes, left=False)
        width = suffix_ids.shape[1]
        lengths = torch.tensor(prefix_lengths, device=self.device).repeat_interleave(n_choices)
        positions = lengths[:, None] + torch.arange(width, device=self.device)[None, :]
        mask = torch.cat([prefix_mask.repeat_interleave(n_choices, dim=0), suffix_mask], dim=1)
        suffix_logits, _ = self._forward_cached(cache, input_ids=suffix_ids, attention_mask=mask,
                                                position_ids=positions)
        suffix_logprobs = torch.log_softmax(suffix_logits.float(), dim=-1)

        scores = np.zeros((n_examples, n_choices))
        for row, suffix_tokens in enumerate(suffixes):
            example, choice = divmod(row, n_choices)
            first_scored = starts[example][choice] - prefix_lengths[example]
            total = 0.0
            for offset in range(first_scored, len(suffix_tokens)):
                token = suffix_tokens[offset]
                if offset == 0:
                    total += last_logprobs[example, token].item()
                else:
                    total += suffix_logprobs[row, offset - 1, token].item()
            scores[example, choice] = total
        return scores

    @torch.inference_mode()
    def token_nll(self, texts: Sequence[str]) -> tuple[float, int]:
        # vLLM's window, one token short of the context (a request there needs room for one generated token):
        # both backends score the same windows, and so measure the same perplexity
        window = self.context_length - 1
        chunks = []
        for ids in self.encode(texts):
            # non-overlapping windows; each window's first token is context only
            chunks.extend(ids[start:start + window] for start in range(0, len(ids) - 1, window - 1))
        total, count = 0.0, 0
        for batch in self._batches([len(chunk) for chunk in chunks]):
            ids, mask = self._pad([chunks[i] for i in batch], left=False)
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            valid = mask[:, 1:].bool()
            total -= logprobs[valid].sum().item()
            count += int(valid.sum().item())
        return total, count

    @torch.no_grad()
    def swap_weights(self, model_dir: str) -> None:
        """Copy the checkpoint's tensors into the loaded model's, converting to its dtype as loading does.

        Tensors that share storage (tied embeddings) are one target, written from whichever of their names
        the checkpoint holds. The swap is refused, and the model built anew, wherever a fresh load could
        set the model differently: a target the checkpoint lacks (loading would initialise it), a tensor the
        model lacks (loading would rename or drop it), a shape that differs, tied names with different
        values."""
        from ckpt_stability.checkpoints import iter_tensors, weight_files

        loaded = {name: tensor for path in weight_files(model_dir) for name, tensor in iter_tensors(path)}
        targets: dict[tuple, list[str]] = {}  # one entry per storage, with every name it goes by
        state = self.model.state_dict()
        for name, tensor in state.items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
            targets.setdefault(key, []).append(name)
        unknown = sorted(loaded.keys() - state.keys())
        if unknown:
            raise WeightsNotSwappable(f"{model_dir} has {len(unknown)} tensor(s) the loaded model has not, e.g. "
                                      f"{unknown[0]!r}")
        sources = []
        for names in targets.values():
            present = [name for name in names if name in loaded]
            if not present:
                raise WeightsNotSwappable(f"{model_dir} has no {names[0]!r}")
            source = loaded[present[0]]
            if tuple(source.shape) != tuple(state[names[0]].shape):
                raise WeightsNotSwappable(f"{model_dir}: {present[0]!r} has shape {tuple(source.shape)}, the loaded "
                                          f"model {tuple(state[names[0]].shape)}")
            if any(not torch.equal(source, loaded[name]) for name in present[1:]):
                raise WeightsNotSwappable(f"{model_dir}: tied tensors {', '.join(present)} differ")
            sources.append((state[names[0]], source))
        for target, source in sources:
            target.copy_(source)

    def provenance(self) -> dict:
        import transformers

        return {
            "backend": self.name,
            "device": self.device if self.device == "cpu" else torch.cuda.get_device_name(),
            "dtype": str(self.torch_dtype).removeprefix("torch."),
            "batch_size": self.batch_size,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads() if self.device == "cpu" else None,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def close(self) -> None:
        del self.model
        if self.device != "cpu":
            torch.cuda.empty_cache()
