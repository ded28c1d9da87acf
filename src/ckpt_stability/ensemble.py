"""Checkpoint ensembles: combine the raw predictions of a window's checkpoints, per example.

One function per method that ``methods.BUILTIN`` says is produced by ENSEMBLE, named after it:

* ``vote``: majority vote over the window's predictions. A tie goes, for choice tasks, to the tied
  answer with the highest window-mean probability (softmax over the choices' log-likelihoods);
  otherwise to the tied answer predicted by the latest checkpoint.
* ``prob`` (choice tasks only): average the window's per-example choice probabilities and predict
  the argmax; ``choice_logprobs`` holds the log of the averaged probabilities.

Both are scored with the task's metric. No model runs here: only prediction files are read.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ckpt_stability.errors import InputError
from ckpt_stability.methods import BUILTIN, ENSEMBLE
from ckpt_stability.metrics import score_examples
from ckpt_stability.predictions import Predictions, excluded_predictions, read_predictions, write_predictions

METHODS = tuple(method.name for method in BUILTIN.produced_by(ENSEMBLE))


def _softmax(logprobs: np.ndarray) -> np.ndarray:
    shifted = np.exp(logprobs - logprobs.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _check_aligned(members: list[Predictions], paths: list[Path]) -> None:
    first, first_path = members[0], paths[0]
    for member, path in zip(members[1:], paths[1:]):
        for key in ("sha256", "name"):
            if member.provenance["task"][key] != first.provenance["task"][key]:
                raise InputError(f"{path}: task {key} {member.provenance['task'][key]!r} differs from "
                                 f"{first.provenance['task'][key]!r} in {first_path}")
        if member.provenance["prompt"]["prompts_sha256"] != first.provenance["prompt"]["prompts_sha256"]:
            raise InputError(f"{path}: its prompts differ from those of {first_path}; ensembles need the "
                             f"same prompts for every checkpoint")
        if not np.array_equal(member.example_id, first.example_id) or member.gold != first.gold:
            raise InputError(f"{path}: examples or gold answers differ from those of {first_path}")


def _mean_probabilities(members: list[Predictions], paths: list[Path]) -> np.ndarray:
    for member, path in zip(members, paths):
        if member.choice_logprobs is None:
            raise InputError(f"{path}: no choice_logprobs (the task was not scored by choice)")
    return np.mean([_softmax(member.choice_logprobs) for member in members], axis=0)


def vote(members: list[Predictions], paths: list[Path]) -> tuple[list[str], np.ndarray | None]:
    """Majority vote; members are ordered oldest first."""
    task = members[0].provenance["task"]
    if task["mode"] == "choice":
        labels = task["label_list"]
        index = {label: i for i, label in enumerate(labels)}
        votes = np.zeros((len(members[0].prediction), len(labels)))
        for member in members:
            votes[np.arange(len(member.prediction)), [index[p] for p in member.prediction]] += 1
        probabilities = _mean_probabilities(members, paths)
        # among the most voted answers, the one with the highest window-mean probability
        tie_break = np.where(votes == votes.max(axis=1, keepdims=True), probabilities, -np.inf)
        return [labels[i] for i in tie_break.argmax(axis=1)], None
    predictions = []
    for answers in zip(*(member.prediction for member in members)):
        counts = Counter(answers)
        top = max(counts.values())
        # the latest checkpoint's answer among the tied ones
        predictions.append(next(a for a in reversed(answers) if counts[a] == top))
    return predictions, None


def prob(members: list[Predictions], paths: list[Path]) -> tuple[list[str], np.ndarray]:
    task = members[0].provenance["task"]
    if task["mode"] != "choice":
        raise InputError(f"{paths[0]}: the prob ensemble needs a choice task, {task['name']} is {task['mode']}")
    probabilities = _mean_probabilities(members, paths)
    return [task["label_list"][i] for i in probabilities.argmax(axis=1)], np.log(probabilities)


def combine(members: list[Predictions], paths: list[Path], method: str, provenance: dict | None = None) -> Predictions:
    """The ensemble of one task's aligned predictions (oldest checkpoint first), scored."""
    predicted, logprobs = COMBINERS[method](members, paths)
    first = members[0]
    return Predictions(
        example_id=first.example_id,
        prediction=predicted,
        gold=first.gold,
        score=np.array(score_examples(first.provenance["task"]["metric"], predicted, first.gold)),
        choice_logprobs=logprobs,
        provenance={
            **{key: first.provenance[key] for key in ("task", "prompt", "backend", "versions")},
            **(provenance or {}),
            "method": method,
            "member_files": [str(path) for path in paths],
            "member_models": [member.provenance.get("model_path") for member in members],
        },
    )


def ensemble_window(member_dirs: list[Path], tasks: list[str], outputs: dict[str, Path],
                    provenance: dict | None = None) -> dict[tuple[str, str], float]:
    """For each task, combine ``{member_dir}/{task}.parquet`` (oldest checkpoint first) by each method of
    ``outputs`` (method -> output directory) into ``{output}/{task}.parquet``; a method is skipped for
    the tasks it does not cover (``prob``: those not scored by choice). Returns the scores."""
    if len(member_dirs) < 2:
        raise InputError(f"an ensemble needs at least 2 checkpoints' predictions, got {len(member_dirs)}")
    scores = {}
    for task in tasks:
        paths = [Path(directory) / f"{task}.parquet" for directory in member_dirs]
        members = [read_predictions(path) for path in paths]
        excluded = next((member for member in members if member.excluded), None)
        if excluded is None:
            _check_aligned(members, paths)
        for method, directory in outputs.items():
            if not BUILTIN[method].covers(members[0].provenance["task"]["mode"]):
                continue
            if excluded is None:
                result = combine(members, paths, method, provenance)
            else:  # like an average over the same window: not built
                step = excluded.provenance.get("step", excluded.provenance.get("model_path"))
                result = excluded_predictions(
                    f"not built: the window contains step {step}, which was excluded: {excluded.excluded}",
                    {**{key: excluded.provenance[key] for key in ("task", "prompt", "versions")},
                     **(provenance or {}), "method": method, "member_files": [str(path) for path in paths]})
            write_predictions(Path(directory) / f"{task}.parquet", result)
            scores[task, method] = result.task_score
    return scores


COMBINERS = {name: globals()[name] for name in METHODS}
"""method -> its function above: a method of the registry without one fails here, at import."""
