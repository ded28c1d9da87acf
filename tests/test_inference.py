"""The transformers backend and the evaluate command, on real tiny models and real (JGLUE) task files."""

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ckpt_stability.backends import load_backend, resolve_backend
from ckpt_stability.backends.transformers import TransformersBackend
from ckpt_stability.predictions import read_predictions
from ckpt_stability.prompts import PromptTemplate
from ckpt_stability.tasks import load_task
from helpers import JGLUE, with_context_length


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def full_sequence_logprob(model, tokenizer, prompt: str, choice: str) -> float:
    """The choice's log-likelihood from one plain forward pass over prompt + choice, no cache, no padding."""
    whole = tokenizer(prompt + choice)["input_ids"]
    start = len(tokenizer(prompt)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(logprobs[position - 1, whole[position]].item() for position in range(start, len(whole)))


@pytest.mark.parametrize("task_file", ["jnli.json", "jcommonsenseqa.json"])
def test_choice_logprobs_equal_a_full_sequence_forward(tiny_model_dir, reference, task_file):
    task = load_task(JGLUE / task_file, num_fewshot=2, max_samples=10)
    prompts = task.prompts(PromptTemplate())
    backend = TransformersBackend(str(tiny_model_dir), batch_size=4)
    scores = backend.choice_logprobs(prompts, task.label_list)
    expected = np.array([[full_sequence_logprob(*reference, prompt, label) for label in task.label_list]
                         for prompt in prompts])
    assert scores.shape == (10, len(task.label_list))
    np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=0)


def test_the_prompts_shared_few_shot_context_runs_once(tiny_model_dir):
    task = load_task(JGLUE / "jnli.json", num_fewshot=2, max_samples=12)
    prompts = task.prompts(PromptTemplate())
    backend = TransformersBackend(str(tiny_model_dir), batch_size=4)
    tokens_run = []
    backend.model.get_input_embeddings().register_forward_hook(lambda _, args, __: tokens_run.append(args[0].numel()))
    backend.choice_logprobs(prompts, task.label_list)
    prompt_lengths = backend.count_tokens(prompts)
    context = PromptTemplate().context(task.instruction, [(shot.input, shot.output) for shot in task.few_shots[:2]])
    context_length = backend.count_tokens([context])[0]
    assert context_length > sum(prompt_lengths) / len(prompts) * 0.6
    # the context once, then each prompt's own tokens (and some padding), then the choices: less than
    # half of one pass over every prompt, which the context alone would take if it ran per prompt
    assert sum(tokens_run) < sum(prompt_lengths) / 2


def test_choices_whose_tokens_merge_with_the_prompt(tiny_model_dir, reference):
    """A choice that merges with the end of the prompt shares less than the whole prompt."""
    prompts = ["### 応答:", "計算：3+4="]
    choices = [":\n7", "7", " 7", "77"]
    scores = TransformersBackend(str(tiny_model_dir), batch_size=2).choice_logprobs(prompts, choices)
    expected = [[full_sequence_logprob(*reference, p, c) for c in choices] for p in prompts]
    np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=0)


def test_batching_gives_the_same_predictions_as_batch_size_one(tiny_model_dir):
    nli = load_task(JGLUE / "jnli.json", num_fewshot=1, max_samples=12)
    squad = load_task(JGLUE / "jsquad.json", num_fewshot=1, max_samples=6)
    one, many = (TransformersBackend(str(tiny_model_dir), batch_size=size) for size in (1, 5))
    prompts = nli.prompts(PromptTemplate())
    single, batched = one.choice_logprobs(prompts, nli.label_list), many.choice_logprobs(prompts, nli.label_list)
    np.testing.assert_allclose(single, batched, atol=1e-4, rtol=0)
    assert (single.argmax(1) == batched.argmax(1)).all()
    prompts = squad.prompts(PromptTemplate())
    generated = one.generate(prompts, 8, ["\n"])
    assert generated == many.generate(prompts, 8, ["\n"])
    assert all("\n" not in text for text in generated)


def test_generation_is_greedy_and_stops_at_the_stop_string(tiny_model_dir, reference):
    model, tokenizer = reference
    prompt = load_task(JGLUE / "jsquad.json", num_fewshot=1).prompts(PromptTemplate())[0]
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = tokenizer.decode(ids[len(tokenizer(prompt)["input_ids"]):], skip_special_tokens=True)
    backend = TransformersBackend(str(tiny_model_dir))
    assert backend.generate([prompt], 6, []) == [greedy]
    assert backend.generate([prompt], 6, [greedy[2:4]]) == [greedy[: greedy.index(greedy[2:4])]]


def test_token_nll_is_the_summed_negative_log_likelihood(tiny_model_dir, reference):
    model, tokenizer = reference
    texts = ["太郎は東京にいます。", "3+4=7\n5+5=10"]
    total, count = TransformersBackend(str(tiny_model_dir), batch_size=2).token_nll(texts)
    expected_total, expected_count = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
        expected_total -= sum(logprobs[i - 1, ids[i]].item() for i in range(1, len(ids)))
        expected_count += len(ids) - 1
    assert count == expected_count
    assert total == pytest.approx(expected_total, abs=1e-3)


def test_backend_choice(tiny_model_dir, monkeypatch):
    assert resolve_backend("transformers") == "transformers"
    assert resolve_backend("auto") in ("transformers", "vllm")
    assert isinstance(load_backend("transformers", str(tiny_model_dir)), TransformersBackend)


def run_evaluate(model_dir, output_dir, *tasks):
    command = [sys.executable, "-m", "ckpt_stability", "evaluate", "--model", str(model_dir), "--output-dir",
               str(output_dir), "--backend", "transformers", "--num-fewshot", "2"]
    for task in tasks:
        command += ["--task", str(task)]
    return subprocess.run(command, capture_output=True, text=True)


def test_evaluate_command_writes_the_contract(tiny_model_dir, tmp_path):
    result = run_evaluate(tiny_model_dir, tmp_path, JGLUE / "jnli.json", JGLUE / "jsquad.json")
    assert result.returncode == 0, result.stderr
    nli = read_predictions(tmp_path / "jnli.parquet")
    assert pq.read_schema(tmp_path / "jnli.parquet").names == [
        "example_id", "prediction", "gold", "score", "choice_logprobs"]
    assert list(nli.example_id) == list(range(24)) and nli.choice_logprobs.shape == (24, 3)
    assert set(nli.prediction) <= {"entailment", "contradiction", "neutral"}
    assert nli.score.tolist() == [float(p == g) for p, g in zip(nli.prediction, nli.gold)]
    squad = read_predictions(tmp_path / "jsquad.parquet")
    assert squad.choice_logprobs is None and squad.provenance["task"]["metric"] == "char_f1"
    provenance = nli.provenance
    assert provenance["model_path"] == str(tiny_model_dir)
    assert provenance["backend"]["backend"] == "transformers" and provenance["backend"]["torch"]
    assert provenance["task"]["sha256"] and provenance["prompt"]["prompts_sha256"]
    assert provenance["prompt"]["num_fewshot"] == 2 and provenance["score"] == pytest.approx(nli.score.mean())


def test_evaluate_refuses_bad_tasks_cleanly(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"instruction": "x", "output_length": 1, "metrics": ["exact_match"],
                               "few_shots": [], "samples": []}))
    result = run_evaluate(tiny_model_dir, tmp_path / "out", bad)
    assert result.returncode == 2
    assert result.stderr.strip() == f"ckpt-stability evaluate: error: {bad}: samples is empty"
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_prompts_longer_than_the_context(tiny_model_dir, reference, tmp_path):
    _, tokenizer = reference
    nli = load_task(JGLUE / "jnli.json", num_fewshot=2)
    nli_needs = max(len(tokenizer(prompt + choice)["input_ids"])
                    for prompt in nli.prompts(PromptTemplate()) for choice in nli.label_list)
    squad = load_task(JGLUE / "jsquad.json", num_fewshot=2)
    squad_needs = [len(tokenizer(prompt)["input_ids"]) + squad.output_length
                   for prompt in squad.prompts(PromptTemplate())]
    assert max(squad_needs) > nli_needs

    # jnli fits exactly; jsquad does not, and is refused before jnli is run
    model = with_context_length(tiny_model_dir, tmp_path, nli_needs)
    result = run_evaluate(model, tmp_path / "out", JGLUE / "jnli.json", JGLUE / "jsquad.json")
    assert result.returncode == 2
    first = next(index for index, needs in enumerate(squad_needs) if needs > nli_needs)
    too_long = sum(needs > nli_needs for needs in squad_needs)
    assert result.stderr.strip().endswith(
        f"error: {JGLUE / 'jsquad.json'}: task jsquad: {too_long} of 24 samples do not fit the {nli_needs}-token "
        f"context of {model}; sample {first} needs {squad_needs[first]} tokens (2-shot prompt and output_length "
        f"{squad.output_length}); lower num_fewshot of this task")
    assert not (tmp_path / "out").exists()

    assert run_evaluate(model, tmp_path / "fits", JGLUE / "jnli.json").returncode == 0
    one_short = with_context_length(tiny_model_dir, tmp_path, nli_needs - 1)
    result = run_evaluate(one_short, tmp_path / "short", JGLUE / "jnli.json")
    assert result.returncode == 2 and "(2-shot prompt and its longest choice)" in result.stderr


def test_demo_predictions_are_deterministic_across_runs(tiny_demo, tmp_path):
    checkpoint = tiny_demo / "checkpoints" / "checkpoint-40"
    tasks = sorted((tiny_demo / "tasks").glob("*.json"))
    for attempt in ("first", "second"):
        result = run_evaluate(checkpoint, tmp_path / attempt, *tasks)
        assert result.returncode == 0, result.stderr
    for task in tasks:
        first, second = (read_predictions(tmp_path / attempt / f"{task.stem}.parquet") for attempt in ("first", "second"))
        assert first.prediction == second.prediction
        assert np.array_equal(first.score, second.score)
        if first.choice_logprobs is not None:
            assert np.array_equal(first.choice_logprobs, second.choice_logprobs)
