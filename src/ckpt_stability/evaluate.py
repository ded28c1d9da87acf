"""Model x tasks -> one prediction file per task.

The evaluation settings (tasks with their category, scoring mode, few-shot count and source, sample
cap; the prompt template; whether prompts get special tokens; the stop strings) come as one JSON
document, so that every checkpoint of a run is evaluated on exactly the same prompts::

    {"tasks": {"jnli": {"path": "data/jnli.json", "category": "NLI", "mode": "choice",
                        "num_fewshot": 4, "max_samples": 500, "few_shot_source": "auto"}},
     "prompt": {"header": "...{instruction}", "example": "...{input}...{output}"},
     "add_special_tokens": true,
     "stop": ["\\n\\n"]}

A generated text is scored on its answer, as llm-jp-eval extracts it (``metrics.extract_answer``: the
text before the first blank line, NFKC-normalised and stripped); that answer is the stored prediction.
The stop strings only end the generation early: stopping at a blank line changes no answer.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ckpt_stability import __version__
from ckpt_stability.backends.base import Backend
from ckpt_stability.atomic import write_text
from ckpt_stability.errors import InputError
from ckpt_stability.metrics import DEFAULT_STOP, extract_answer, score_examples
from ckpt_stability.outcomes import EXCLUDED_KEY, is_out_of_memory
from ckpt_stability.predictions import Predictions, excluded_predictions, write_predictions
from ckpt_stability.prompts import PromptTemplate, prompts_digest
from ckpt_stability.tasks import TASK_OPTIONS, Task, load_task

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class EvaluationSettings:
    tasks: list[Task]
    template: PromptTemplate = field(default_factory=PromptTemplate)
    stop: tuple[str, ...] = DEFAULT_STOP
    add_special_tokens: bool = True

    @classmethod
    def from_json(cls, path: str | Path) -> "EvaluationSettings":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            tasks = [load_task(spec["path"], name=name, **{key: spec[key] for key in TASK_OPTIONS if key in spec})
                     for name, spec in data["tasks"].items()]
            return cls(tasks, PromptTemplate(**data.get("prompt", {})), tuple(data.get("stop", DEFAULT_STOP)),
                       bool(data.get("add_special_tokens", True)))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(f"{path}: invalid evaluation settings ({type(error).__name__}: {error})") from None


def _out_of_memory_hint(error: BaseException, batch_size: int, model_dir: str, task: str) -> InputError | None:
    message = str(error)
    if is_out_of_memory(error):
        return InputError(f"{model_dir}: task {task}: the backend ran out of memory ({type(error).__name__}: "
                          f"{message.splitlines()[0]}); lower batch_size (now {batch_size}; the config key, or "
                          f"--batch-size of ckpt-stability evaluate), "
                          f"or use a smaller dtype")
    return None


def check_context_length(backend: Backend, task: Task, prompts: list[str], model_dir: str) -> None:
    """Refuse a task whose prompts, with their answer, do not fit the model's context: past it the scores
    mean nothing (positions the model never trained on), vLLM refuses such prompts, and cutting the
    prompt would silently drop the instruction or the sample."""
    prompt_lengths = backend.count_tokens(prompts)
    if task.mode == "choice":
        # every prompt ends with the same response header, so a choice adds as many tokens to any of them
        first_prompt = backend.count_tokens([prompts[0] + choice for choice in task.label_list])
        room, answer = max(first_prompt) - prompt_lengths[0], "its longest choice"
    else:
        room, answer = task.output_length, f"output_length {task.output_length}"
    needed = [length + room for length in prompt_lengths]
    too_long = [index for index, length in enumerate(needed) if length > backend.context_length]
    if too_long:
        first = too_long[0]
        raise InputError(
            f"{task.path}: task {task.name}: {len(too_long)} of {len(prompts)} samples do not fit the "
            f"{backend.context_length}-token context of {model_dir}; sample {first} needs {needed[first]} tokens "
            f"({task.num_fewshot}-shot prompt and {answer}); lower num_fewshot of this task")


def evaluate_model(backend: Backend, model_dir: str, settings: EvaluationSettings, output_dir: str | Path,
                   provenance: dict | None = None) -> dict[str, float]:
    """Evaluate one loaded model on every task; write ``{output_dir}/{task}.parquet``; return the scores."""
    output_dir = Path(output_dir)
    task_prompts = [task.prompts(settings.template) for task in settings.tasks]
    for task, prompts in zip(settings.tasks, task_prompts):  # before any inference: fail in seconds
        check_context_length(backend, task, prompts, model_dir)
    scores = {}
    for task, prompts in zip(settings.tasks, task_prompts):
        started = time.perf_counter()
        try:
            if task.mode == "choice":
                logprobs = backend.choice_logprobs(prompts, task.label_list)
                predicted = [task.label_list[i] for i in np.argmax(logprobs, axis=1)]
            else:
                logprobs = None
                predicted = [extract_answer(text) for text in backend.generate(prompts, task.output_length,
                                                                               settings.stop)]
        except (RuntimeError, MemoryError) as error:
            hint = _out_of_memory_hint(error, getattr(backend, "batch_size", 0), model_dir, task.name)
            if hint is None:
                raise
            raise hint from error
        golds = [sample.output for sample in task.samples]
        predictions = Predictions(
            example_id=np.arange(len(task.samples)),
            prediction=predicted,
            gold=golds,
            score=np.array(score_examples(task.metric, predicted, golds)),
            choice_logprobs=logprobs,
            provenance={**_task_provenance(task, prompts, settings, model_dir, provenance),
                        "backend": backend.provenance()},
        )
        write_predictions(output_dir / f"{task.name}.parquet", predictions)
        scores[task.name] = predictions.task_score
        log.info("%s: %s = %.4f over %d examples (%.1f s)", task.name, task.metric, predictions.task_score,
                 len(golds), time.perf_counter() - started)
    return scores


def _task_provenance(task: Task, prompts: list[str], settings: EvaluationSettings, model_dir: str | Path,
                     provenance: dict | None) -> dict:
    """What identifies one task's predictions, whatever the backend: model, task file, prompts."""
    return {
        **(provenance or {}),
        "model_path": str(model_dir),
        "versions": {"ckpt_stability": __version__, "python": platform.python_version()},
        "task": {"name": task.name, "path": str(task.path), "sha256": task.sha256,
                 "category": task.category, "mode": task.mode, "metric": task.metric,
                 "label_list": list(task.label_list) if task.label_list else None,
                 "output_length": task.output_length},
        "prompt": {"num_fewshot": task.num_fewshot, "template": asdict(settings.template),
                   "template_sha256": settings.template.digest(),
                   "prompts_sha256": prompts_digest(prompts), "stop": list(settings.stop),
                   "few_shot_path": str(task.few_shot_path), "add_special_tokens": settings.add_special_tokens},
    }


def record_excluded(model_dir: str | Path, reason: str, settings: EvaluationSettings, output_dir: str | Path,
                    perplexity_output: Path | None = None, provenance: dict | None = None) -> None:
    """Write the outputs of a model that cannot be evaluated (see ``outcomes``): every task's prediction file
    without rows and, when asked, the perplexity file, each holding ``reason``."""
    for task in settings.tasks:
        task_provenance = _task_provenance(task, task.prompts(settings.template), settings, model_dir, provenance)
        write_predictions(Path(output_dir) / f"{task.name}.parquet", excluded_predictions(reason, task_provenance))
    if perplexity_output is not None:
        result = {**(provenance or {}), "model_path": str(model_dir), EXCLUDED_KEY: reason}
        write_text(perplexity_output, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    log.warning("%s: excluded from the results: %s", model_dir, reason)


def measure_perplexity(backend: Backend, model_dir: str, text_path: Path, output: Path,
                       provenance: dict | None = None) -> float:
    """The model's perplexity on a held-out text, exp(mean token NLL), split into windows of the model's
    context length less one token (``Backend.token_nll``); written as JSON with its inverse, the proxy of
    the indicators."""
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{text_path}: cannot read the held-out text ({error})") from None
    if not text.strip():
        raise InputError(f"{text_path}: the held-out text is empty")
    started = time.perf_counter()
    nll, tokens = backend.token_nll([text])
    result = {**(provenance or {}), "model_path": str(model_dir), "text": str(text_path), "tokens": tokens,
              "nll": nll, "perplexity": math.exp(nll / tokens), "inverse_perplexity": math.exp(-nll / tokens),
              "backend": backend.provenance()}
    write_text(output, json.dumps(result, indent=1) + "\n")
    log.info("perplexity %.4f over %d tokens of %s (%.1f s)", result["perplexity"], tokens, text_path,
             time.perf_counter() - started)
    return result["perplexity"]
