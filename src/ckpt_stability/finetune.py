"""Supervised fine-tuning of a checkpoint: the outcome that the pretraining indicators are measured against.

Zeng et al. (arXiv:2504.12491) ask which signal, available during pretraining, predicts how well a
checkpoint does once fine-tuned. ``finetune`` answers the second half for one model: it fine-tunes a copy
of a checkpoint (raw, or an averaged model) on instruction data (``instruction_data``) with a recipe,
using transformers' ``Trainer``, and writes the fine-tuned model, which the workflow then evaluates on its
target tasks like any other model.

* **Loss**: on the completion only (the prompt's tokens are masked out), with the tokenizer's EOS after
  each completion; the prompt is tokenized as evaluation tokenizes it (with or without special tokens).
* **Determinism**: ``Trainer`` with ``full_determinism`` and the recipe's seed (weight init of LoRA, data
  order) on a fixed number of threads: on the CPU, the same recipe gives bitwise the same weights on the
  same machine (on a GPU, seeded, with bfloat16 autocast where the GPU has it).
* **LoRA** (``Recipe.lora``, with peft): adapters on every linear layer, merged into the weights before
  saving, so that the fine-tuned model is an ordinary checkpoint for both backends.
* **Refusals**: an unusable checkpoint (``outcomes``) or a fine-tune whose loss or weights become
  non-finite is ``UnusableCheckpoint``, which the workflow records as that model's outcome (``excluded``)
  instead of failing; bad data fails the job with the file and the example named.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ckpt_stability import __version__
from ckpt_stability.atomic import atomic_directory, write_text
from ckpt_stability.errors import InputError, UnusableCheckpoint
from ckpt_stability.instruction_data import InstructionData, read_instruction_data
from ckpt_stability.outcomes import EXCLUDED_KEY, write_excluded_directory
from ckpt_stability.prompts import PromptTemplate

log = logging.getLogger(__name__)

IGNORED_LABEL = -100
"""the label of the prompt's tokens: no loss (PyTorch's cross-entropy ignore_index)"""


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0


@dataclass(frozen=True)
class Recipe:
    """How a checkpoint is fine-tuned. ``steps`` or ``epochs`` (neither: one epoch)."""

    learning_rate: float = 2e-5
    batch_size: int = 16
    seed: int = 0
    steps: int | None = None
    epochs: float | None = None
    lora: LoraSettings | None = None
    """None: full fine-tuning"""

    def __post_init__(self):
        if self.steps is not None and self.epochs is not None:
            raise InputError("a fine-tuning recipe gives steps or epochs, not both")
        if not (self.learning_rate > 0 and self.batch_size >= 1 and (self.steps is None or self.steps >= 1)
                and (self.epochs is None or self.epochs > 0)):
            raise InputError(f"a fine-tuning recipe needs a positive learning rate, batch size, steps or epochs: "
                             f"{self}")

    def describe(self) -> str:
        """One line, e.g. ``full, 60 steps, lr 0.001, batch 16, seed 0``."""
        kind = f"LoRA r={self.lora.r} alpha={self.lora.alpha}" if self.lora else "full"
        epochs = self.epochs or 1
        length = f"{self.steps} steps" if self.steps else f"{epochs:g} epoch{'s' * (epochs != 1)}"
        return f"{kind}, {length}, lr {self.learning_rate:g}, batch {self.batch_size}, seed {self.seed}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Diverged(UnusableCheckpoint):
    """The fine-tune's loss or weights became non-finite."""


def _tokenize(tokenizer, data: InstructionData, add_special_tokens: bool, context_length: int) -> list[dict]:
    """input_ids, attention_mask and labels (the prompt masked) of every example."""
    prompts = tokenizer([e.prompt for e in data.examples], add_special_tokens=add_special_tokens)["input_ids"]
    completions = tokenizer([e.completion for e in data.examples], add_special_tokens=False)["input_ids"]
    features = []
    for number, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = prompt + completion + [tokenizer.eos_token_id]
        if len(ids) > context_length:
            raise InputError(f"{data.path}: example {number} has {len(ids)} tokens, more than the model's "
                             f"{context_length}-token context")
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [IGNORED_LABEL] * len(prompt) + completion + [tokenizer.eos_token_id]})
    return features


def _loss_watch(total_steps: int, model_dir: Path):
    """A Trainer callback that logs the loss ten times per fine-tune and stops a diverged one at once."""
    from transformers import TrainerCallback

    every = max(1, total_steps // 10)

    class LossWatch(TrainerCallback):
        def __init__(self):
            self.losses: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "loss" not in logs:
                return
            loss = float(logs["loss"])
            self.losses.append(loss)
            if not math.isfinite(loss):
                raise Diverged(f"{model_dir}: fine-tuning diverged: the loss is {loss} at step {state.global_step}")
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                log.info("step %d/%d: loss %.4f", state.global_step, state.max_steps, loss)

    return LossWatch()


def finetune(model_dir: str | Path, data: InstructionData, recipe: Recipe, output: str | Path, *,
             add_special_tokens: bool = True, threads: int | None = None) -> dict:
    """Fine-tune ``model_dir`` on ``data`` with ``recipe``; write the fine-tuned model (a Hugging Face
    directory, in the checkpoint's dtype) to ``output``. Returns what the record keeps: steps, losses, time."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, PrinterCallback,
                              Trainer, TrainingArguments, set_seed)

    from ckpt_stability.backends.transformers import no_progress_bars
    from ckpt_stability.checkpoints import read_config
    from ckpt_stability.outcomes import check_usable, loading_failure

    started = time.perf_counter()
    model_dir = Path(model_dir)
    check_usable(model_dir)
    if threads:
        torch.set_num_threads(threads)
    set_seed(recipe.seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        with no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except Exception as error:
        raise loading_failure(error, model_dir) or error
    if tokenizer.eos_token_id is None:
        raise UnusableCheckpoint(f"{model_dir}: the tokenizer has no EOS token to end a completion with")
    if tokenizer.pad_token_id is None:  # (the saved model gets the checkpoint's own tokenizer files, below)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # positions count from the first token
    context_length = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    features = _tokenize(tokenizer, data, add_special_tokens, int(context_length))
    if recipe.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha,
                                                 lora_dropout=recipe.lora.dropout, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    on_gpu = torch.cuda.is_available()
    steps = recipe.steps or math.ceil(len(features) / recipe.batch_size * (recipe.epochs or 1))
    watch = _loss_watch(steps, model_dir)
    with tempfile.TemporaryDirectory(prefix="finetune-") as scratch:
        arguments = TrainingArguments(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=recipe.batch_size,
            # bitwise determinism on the CPU; on a GPU, deterministic kernels are not there for every op
            learning_rate=recipe.learning_rate, seed=recipe.seed, data_seed=recipe.seed, full_determinism=not on_gpu,
            use_cpu=not on_gpu, bf16=on_gpu and torch.cuda.is_bf16_supported(), save_strategy="no",
            logging_steps=1, logging_nan_inf_filter=False, disable_tqdm=True, report_to="none",
            remove_unused_columns=False, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=arguments, train_dataset=features, callbacks=[watch],
                          data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORED_LABEL))
        trainer.remove_callback(PrinterCallback)  # the loss dicts on stdout: LossWatch logs them
        trainer.train()
    if recipe.lora:
        model = model.merge_and_unload()
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            raise Diverged(f"{model_dir}: fine-tuning diverged: tensor {name!r} is no longer finite")
    config = read_config(model_dir)  # saved in the dtype the checkpoint declares (float32 when it declares none)
    model = model.to(device="cpu", dtype=getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32"))
    with atomic_directory(Path(output)) as directory, no_progress_bars():
        model.save_pretrained(directory, safe_serialization=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(directory)
    summary = {"examples": len(features), "optimizer_steps": steps,
               "epochs": round(steps * recipe.batch_size / len(features), 4),
               "first_loss": watch.losses[0], "final_loss": watch.losses[-1],
               "seconds": round(time.perf_counter() - started, 2), "device": "cuda" if on_gpu else "cpu"}
    log.info("fine-tuned %s: %s", model_dir, summary)
    return summary


def finetune_or_record(model_dir: Path, data_path: Path, recipe: Recipe, output: Path, record: Path, *,
                       record_unusable: bool, template: PromptTemplate = PromptTemplate(),
                       add_special_tokens: bool = True, threads: int | None = None, meta: dict | None = None) -> None:
    """``finetune``, then its record (``record``: JSON with the model, the data and its hash, the recipe and
    the training summary). Where the checkpoint is unusable or the fine-tune diverges and ``record_unusable``
    is set, ``output`` holds only the reason (``outcomes``) and so does the record, under ``excluded``."""
    import torch
    import transformers

    data = read_instruction_data(data_path, template)  # bad data is the data's fault: fail, never record
    provenance = {
        **(meta or {}), "model_path": str(model_dir), "data": str(data_path), "data_sha256": data.sha256,
        "recipe": recipe.to_json(), "recipe_text": recipe.describe(), "add_special_tokens": add_special_tokens,
        "versions": {"ckpt_stability": __version__, "python": platform.python_version(),
                     "torch": torch.__version__, "transformers": transformers.__version__},
    }
    try:
        result = finetune(model_dir, data, recipe, output, add_special_tokens=add_special_tokens, threads=threads)
    except UnusableCheckpoint as error:
        if not record_unusable:
            raise
        result = {EXCLUDED_KEY: f"not fine-tuned: {error}"}
        write_excluded_directory(output, result[EXCLUDED_KEY])
        log.warning("%s: %s", output, result[EXCLUDED_KEY])
    write_text(record, json.dumps({**provenance, **result}, ensure_ascii=False, indent=1) + "\n")
