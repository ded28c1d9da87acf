"""Per-example task metrics, each in [0, 1], as llm-jp-eval defines them.

Both the prediction and the gold answer are NFKC-normalised and stripped first (llm-jp-eval's
``normalize``). The task score is the mean over examples of the task's first metric.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

from rapidfuzz import fuzz


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).strip()


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold))


def char_f1(prediction: str, gold: str) -> float:
    """llm-jp-eval's char_f1: fuzzy token-sort ratio of the two strings / 100."""
    return fuzz.token_sort_ratio(normalize(prediction), normalize(gold)) / 100.0


def set_f1(prediction: str, gold: str) -> float:
    """F1 between the sets of newline-separated items."""
    predicted = {item.strip() for item in normalize(prediction).split("\n")}
    expected = {item.strip() for item in normalize(gold).split("\n")}
    hits = len(predicted & expected)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(expected)
    return 2 * precision * recall / (precision + recall)


def _sentence_bleu(tokenize: str) -> Callable[[str, str], float]:
    def bleu(prediction: str, gold: str) -> float:
        import sacrebleu  # imported on first use: only translation tasks need it

        score = sacrebleu.sentence_bleu(normalize(prediction), [normalize(gold)], tokenize=tokenize)
        return score.score / 100.0

    bleu.__doc__ = f"Sentence-level BLEU (sacrebleu, tokenize={tokenize!r}) / 100."
    return bleu


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "char_f1": char_f1,
    "set_f1": set_f1,
    "bleu": _sentence_bleu("13a"),
    # llm-jp-eval's names for BLEU into English and into Japanese; Japanese has no spaces, so it is
    # tokenised by character (llm-jp-eval uses MeCab there, which would add a system dependency).
    "bleu_en": _sentence_bleu("13a"),
    "bleu_ja": _sentence_bleu("char"),
}


def score_examples(metric: str, predictions: list[str], golds: list[str]) -> list[float]:
    function = METRICS[metric]
    return [function(prediction, gold) for prediction, gold in zip(predictions, golds, strict=True)]


def prediction_similarity(mode: str, metric: str) -> Callable[[str, str], float]:
    """How alike two predictions of one example are, for the instability score: exact equality for
    choice tasks and exact_match tasks, char_f1 between the two predictions otherwise."""
    if mode == "choice" or metric == "exact_match":
        return exact_match
    return char_f1
