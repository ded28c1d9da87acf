"""Per-example task metrics, computed as llm-jp-eval (v1.x) computes them and reported in [0, 1].

llm-jp-eval scores a generation on its answer, :func:`extract_answer` (the text before the first blank
line, NFKC-normalised and stripped), against the NFKC-normalised gold, which it does not strip. Every
metric here NFKC-normalises both of its arguments (a no-op on an extracted answer); only BLEU strips them.
llm-jp-eval keeps BLEU on 0-100 and divides ``fuzz.token_sort_ratio`` by 100 for char_f1; here BLEU is
divided by 100 too. The task score is the mean over examples of the first of the task's metrics that is
computed here."""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING

from rapidfuzz.distance import Indel

if TYPE_CHECKING:
    from sacrebleu.metrics import BLEU


def normalize(text: str) -> str:
    """llm-jp-eval's ``normalize``: NFKC, nothing else."""
    return unicodedata.normalize("NFKC", text)


DEFAULT_STOP = ("\n\n",)
"""where the answer ends (``extract_answer``): generating past it changes nothing"""


def extract_answer(generated: str) -> str:
    """The answer llm-jp-eval scores: the generation up to its first blank line, NFKC-normalised, then
    stripped."""
    return normalize(generated.split("\n\n")[0]).strip()


def exact_match(answer: str, gold: str) -> float:
    return float(normalize(answer) == normalize(gold))


# fuzzywuzzy's full_process(force_ascii=True), which token_sort_ratio applies to both sides: drop
# U+0080-U+00FF (its "asciidammit"), turn every non-word character into a space with this very pattern
# (Python's \w: letters, digits and "_"; rapidfuzz's default_process differs on "_" and on combining
# marks), then lower-case.
_LATIN_1 = dict.fromkeys(range(0x80, 0x100))
_NON_WORD = re.compile(r"(?ui)\W")


def _sorted_tokens(text: str) -> str:
    text = _NON_WORD.sub(" ", text.translate(_LATIN_1)).lower()
    return " ".join(sorted(text.split()))


def char_f1(answer: str, gold: str) -> float:
    """llm-jp-eval's char_f1, ``fuzzywuzzy.fuzz.token_sort_ratio / 100`` (fuzzywuzzy 0.18 with
    python-Levenshtein, whose ratio is rapidfuzz's normalised Indel similarity), with rapidfuzz as the
    engine. The checks run on the processed, token-sorted strings: equal ones score 1 (two strings that
    both process to nothing included), then an empty side scores 0."""
    a, b = _sorted_tokens(normalize(answer)), _sorted_tokens(normalize(gold))
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    # fuzzywuzzy's int(round(100 * ratio)): an integer percentage, ties to even (12.5 -> 12)
    return round(100 * Indel.normalized_similarity(a, b)) / 100.0


def set_f1(answer: str, gold: str) -> float:
    """llm-jp-eval's set_f1 over newline-separated, stripped items. The answer's items are a set, the
    gold's a list: a duplicated gold item adds to recall's denominator only, as a predicted item is
    counted once."""
    predicted = {item.strip() for item in normalize(answer).split("\n")}
    expected = [item.strip() for item in normalize(gold).split("\n")]
    hits = sum(item in expected for item in predicted)
    precision, recall = hits / len(predicted), hits / len(expected)
    # the same operations in the same order as llm-jp-eval, so that the floats are equal too
    return 2 * (precision * recall) / (precision + recall) if hits else 0.0


@functools.cache
def _bleu_scorer(target_language: str) -> BLEU:
    from sacrebleu.metrics import BLEU  # imported on first use: only translation tasks need it (and MeCab)

    return BLEU(trg_lang=target_language, effective_order=True)


def _llm_jp_eval_bleu(target_language: str) -> Callable[[str, str], float]:
    def bleu(answer: str, gold: str) -> float:
        answer, gold = normalize(answer).strip(), normalize(gold).strip()
        if not answer or not gold:
            # sacrebleu cannot score an empty string the way below; llm-jp-eval then puts
            # float(answer == gold) among its 0-100 BLEU scores, so equal empty strings score 1 of 100
            return float(answer == gold) / 100.0
        # llm-jp-eval hands sacrebleu the two strings themselves as the corpora, so each character is a
        # one-character segment scored against the gold's character at the same position (the longer
        # string cut to the shorter's length). Called the same way, so the score is llm-jp-eval's.
        return _bleu_scorer(target_language).corpus_score(answer, [gold]).score / 100.0

    bleu.__doc__ = f"llm-jp-eval's BLEU (sacrebleu, trg_lang={target_language!r}, effective_order) / 100."
    return bleu


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "char_f1": char_f1,
    "set_f1": set_f1,
    "bleu_en": _llm_jp_eval_bleu("en"),
    "bleu_ja": _llm_jp_eval_bleu("ja"),  # MeCab (IPAdic) tokenisation, from sacrebleu[ja]
    "bleu": _llm_jp_eval_bleu("en"),  # this project's older name for bleu_en
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
