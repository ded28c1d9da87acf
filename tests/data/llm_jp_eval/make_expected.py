"""Regenerates expected_metrics.json: llm-jp-eval's per-example scores, computed by the reference
libraries themselves, for tricky cases and ~400 JSQuAD-like answer variants.

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install fuzzywuzzy==0.18.0 python-Levenshtein==0.21.1 rapidfuzz==3.6.1 "sacrebleu[ja]==2.4.0"
    /tmp/refenv/bin/python tests/data/llm_jp_eval/make_expected.py

Those are the versions llm-jp-eval's lock file pins (v1.3.0's poetry.lock: fuzzywuzzy 0.18.0,
python-levenshtein 0.21.1, whose ratio is rapidfuzz's Indel similarity, rapidfuzz 3.6.1, sacrebleu 2.4.0
with MeCab/IPAdic). fuzzywuzzy and python-Levenshtein are GPL: they are needed to regenerate this file
only, never at run time and never by the tests, which read the JSON and compare the project's own
(rapidfuzz-based) metrics with it.

The scoring procedure mirrors llm-jp-eval's ``get_evaluation_result`` (src/llm_jp_eval/utils.py,
Apache-2.0), restated here rather than copied:

* answer ``y_pred = normalize(output.split("\\n\\n")[0]).strip()`` (v1.4.x; v1.3.0 has no ``.strip()``),
  gold ``y_true = normalize(output)`` with ``normalize`` = NFKC and no strip;
* exact_match: ``y_pred == y_true``;
* char_f1: ``fuzz.token_sort_ratio(y_pred, y_true) / 100``;
* set_f1: the answer's stripped lines as a set, the gold's as a list; both precision and recall count
  the answer's lines found among the gold's (v1.3.0, the lines under ``metric == "set_f1"``);
* bleu_en / bleu_ja: ``BLEU(effective_order=True)`` / ``BLEU(trg_lang="ja", effective_order=True)``,
  ``.corpus_score(y_pred, [y_true]).score`` with the two strings themselves as the corpora (v1.3.0);
  sacrebleu raises IndexError on an empty string there, so, as later versions guard it, both sides are
  stripped and an empty side scores ``float(y_pred == y_true)`` on the 0-100 list.
"""

from __future__ import annotations

import json
import platform
import unicodedata
from importlib.metadata import version
from pathlib import Path

from fuzzywuzzy import fuzz
from sacrebleu.metrics import BLEU

HERE = Path(__file__).parent
JSQUAD = HERE.parent / "jglue" / "jsquad.json"
OUTPUT = HERE / "expected_metrics.json"


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def answer_of(generated: str) -> str:
    return normalize(generated.split("\n\n")[0]).strip()


def set_f1(y_pred: str, y_true: str) -> float:
    predicted = list({line.strip() for line in y_pred.split("\n")})
    expected = [line.strip() for line in y_true.split("\n")]
    found = sum(1 if line in expected else 0 for line in predicted)
    precision, recall = found / len(predicted), found / len(expected)
    return 2 * (precision * recall) / (precision + recall) if (precision + recall) != 0 else 0


BLEU_EN = BLEU(effective_order=True)
BLEU_JA = BLEU(trg_lang="ja", effective_order=True)


def bleu(scorer: BLEU, y_pred: str, y_true: str) -> float:
    if y_pred.strip() and y_true.strip():
        return scorer.corpus_score(y_pred.strip(), [y_true.strip()]).score
    return float(y_pred.strip() == y_true.strip())


def expected(generated: str, gold: str) -> dict:
    y_pred, y_true = answer_of(generated), normalize(gold)
    return {
        "answer": y_pred,
        "expected": {
            "exact_match": float(y_pred == y_true),
            "char_f1": fuzz.token_sort_ratio(y_pred, y_true),
            "set_f1": float(set_f1(y_pred, y_true)),
            "bleu_en": bleu(BLEU_EN, y_pred, y_true),
            "bleu_ja": bleu(BLEU_JA, y_pred, y_true),
        },
    }


# (group, generated, gold): hand-made cases, each probing one rule of the reference.
TRICKY = [
    ("brackets", "「東京」", "東京"), ("brackets", "『東京』", "東京"), ("brackets", "（東京）", "東京"),
    ("brackets", "[東京]", "東京"), ("brackets", '"東京"', "東京"), ("brackets", "「」", ""),
    ("punctuation", "東京。", "東京"), ("punctuation", "東京、大阪", "大阪、東京"), ("punctuation", "東京!?", "東京"),
    ("punctuation", "ジェイ・キャスト", "ジェイキャスト"), ("punctuation", "株式会社ジェイ・キャスト", "ジェイ・キャスト"),
    ("punctuation", "。", "、"), ("punctuation", "...", "!!!"),
    ("case", "Tokyo", "tokyo"), ("case", "TOKYO Tower", "tokyo tower"), ("case", "The Quick Brown Fox", "the quick brown fox"),
    ("case", "iPhone", "IPHONE"),
    ("width", "ＡＢＣ", "abc"), ("width", "３", "3"), ("width", "ｶﾀｶﾅ", "カタカナ"), ("width", "１，０００円", "1,000円"),
    ("width", "　東京　", "東京"), ("width", "Ｈ２Ｏ", "H2O"), ("width", "ｼﾍﾞﾘｱ気団", "シベリア気団"),
    ("latin1", "café", "cafe"), ("latin1", "© 2020", "2020"), ("latin1", "3×4", "3x4"), ("latin1", "東京·大阪", "東京・大阪"),
    ("latin1", "½", "1/2"), ("latin1", "µm", "μm"), ("latin1", "naïve", "naive"), ("latin1", "Ünïcödé", "unicode"),
    ("latin1", "é", ""), ("latin1", "©", "®"), ("latin1", "ß", "ss"), ("latin1", "Straße", "strasse"),
    ("latin1", "ª", "a"), ("latin1", "x²", "x2"), ("latin1", "e\u0301", "é"),
    ("empty", "", "東京"), ("empty", "東京", ""), ("empty", "", ""), ("empty", "", "・"), ("empty", "\n\n東京", "東京"),
    ("whitespace", "   ", "東京"), ("whitespace", " \n ", ""), ("whitespace", "\t東京\t", "東京"),
    ("whitespace", " 東京 ", " 東京 "), ("whitespace", "東京", "東京 "), ("whitespace", "東京\n", "東京"),
    ("whitespace", "東京", "\n東京"), ("whitespace", "\u3000", " "), ("whitespace", "東京\r\n", "東京"),
    ("lines", "a\nb", "a\nb"), ("lines", "a\na", "a"), ("lines", "a", "a\na"), ("lines", "a\nb\nc", "b\nc\nd"),
    ("lines", "a\n\nb", "a\nb"), ("lines", " b \na", "a\nb"), ("lines", "a\nb\nb", "a\nb\nb"), ("lines", "x", "a\nb"),
    ("lines", "東京\n大阪\n東京", "東京\n大阪"), ("lines", "a", "a\n\nb"), ("lines", "a\n \nb", "a\nb"),
    ("lines", "a\nb", "a\nb\nb\nb"), ("lines", "a\nb\nc\nd", "a"), ("lines", "", "\n"),
    ("multiline", "東京\n\n理由: 首都だから", "東京"), ("multiline", "東京\n理由: 首都だから", "東京"),
    ("multiline", "東京\n \n大阪", "東京"), ("multiline", "東京\n\n\n大阪", "東京\n大阪"),
    ("mixed", "東京タワーTokyo Tower", "東京タワー"), ("mixed", "第2次世界大戦", "第二次世界大戦"),
    ("mixed", "iPhone 15 Pro", "iphone15pro"), ("mixed", "ひらがなカタカナ漢字", "カタカナ ひらがな 漢字"),
    ("mixed", "ＪＲ東日本", "JR東日本"), ("mixed", "ロシア連邦（Russia）", "ロシア連邦"),
    ("numbers", "1,000", "1000"), ("numbers", "1000円", "千円"), ("numbers", "3.14", "3.14"), ("numbers", "5月上旬", "5月"),
    ("numbers", "２０２０年", "2020年"), ("numbers", "12", "21"), ("numbers", "①", "1"), ("numbers", "Ⅻ", "XII"),
    ("underscore", "snake_case", "snake case"), ("underscore", "_", ""), ("underscore", "a_b", "a b"),
    ("combining", "か\u3099", "が"), ("combining", "İstanbul", "istanbul"), ("combining", "Σίσυφος", "σίσυφοσ"),
    ("order", "大阪 東京", "東京 大阪"), ("order", "b a", "a b c"), ("order", "the mat on cat", "the cat on the mat"),
    # 100 * ratio exactly halfway between two integers: fuzzywuzzy rounds half to even
    ("ties", "a" + "x" * 14, "a"), ("ties", "abc" + "x" * 10, "abc"), ("ties", "abcde" + "x" * 6, "abcde"),
    ("ties", "abcdefg" + "xx", "abcdefg"), ("ties", "東" + "京" * 14, "東"), ("ties", "シベリア" + "x" * 8, "シベリア"),
    ("bleu", "the cat sat on the mat", "the cat sat on a mat"), ("bleu", "a b c d", "a b c e"),
    ("bleu", "猫がマットの上に座った。", "猫はマットの上に座っていた。"), ("bleu", "abc", "abcdef"), ("bleu", "abcdef", "abc"),
    ("bleu", "It is raining today.", "Today it is raining."), ("bleu", "今日は雨です。", "今日は雨が降っています。"),
]

# Half-width katakana: the inverse of NFKC on U+FF61-U+FF9F, plus the separate (han)dakuten marks.
HALF_WIDTH = {unicodedata.normalize("NFKC", chr(code)): chr(code) for code in range(0xFF61, 0xFFA0)}
SEPARATE_MARKS = {"\u3099": "\uff9e", "\u309a": "\uff9f"}


def half_width(text: str) -> str:
    out = []
    for char in text:
        base, *marks = unicodedata.normalize("NFD", char)
        if base in HALF_WIDTH and all(mark in SEPARATE_MARKS for mark in marks):
            out.append(HALF_WIDTH[base] + "".join(SEPARATE_MARKS[mark] for mark in marks))
        else:
            out.append(char)
    return "".join(out)


def full_width(text: str) -> str:
    return "".join(chr(ord(char) + 0xFEE0) if "!" <= char <= "~" else char for char in text)


def variants(gold: str, other: str) -> list[str]:
    """20 answers a model might give for ``gold`` (JSQuAD's answers are short noun phrases)."""
    middle = max(1, len(gold) // 2)
    return [
        gold, f"「{gold}」", f"『{gold}』", f"{gold}。", f"{gold}です", f"{gold}です。", f" {gold} ", f"答え：{gold}",
        f"{gold}\n\n根拠: 本文の第2段落より。", f"{gold}\n", half_width(gold), full_width(f"{gold} (A1)"),
        f"{gold}（だと思います）", gold[:middle], f"{gold}の{gold}", other, f"「{gold}」です。", f"{gold}、です",
        f"{gold[:middle]} {gold[middle:]}", f"The answer is {gold}",
    ]


def jsquad_cases() -> list[tuple[str, str, str]]:
    data = json.loads(JSQUAD.read_text(encoding="utf-8"))
    golds = list(dict.fromkeys(example["output"] for example in data["few_shots"] + data["samples"]))
    return [("jsquad", variant, gold)
            for index, gold in enumerate(golds)
            for variant in variants(gold, golds[(index + 1) % len(golds)])]


def main() -> None:
    cases = [{"id": index, "group": group, "generated": generated, "gold": gold, **expected(generated, gold)}
             for index, (group, generated, gold) in enumerate(TRICKY + jsquad_cases())]
    document = {
        "about": "llm-jp-eval's per-example scores of `answer` (extracted from `generated`) against `gold`, "
                 "computed by the reference libraries; regenerate with make_expected.py",
        "scale": {
            "exact_match": "0 or 1",
            "char_f1": "0-100: fuzz.token_sort_ratio, an integer; llm-jp-eval divides it by 100",
            "set_f1": "0-1, as llm-jp-eval computes it",
            "bleu_en": "0-100: sacrebleu's BLEU score as llm-jp-eval keeps it",
            "bleu_ja": "0-100: sacrebleu's BLEU score as llm-jp-eval keeps it",
        },
        "reference": {package: version(package) for package in
                      ("fuzzywuzzy", "python-Levenshtein", "rapidfuzz", "sacrebleu", "mecab-python3", "ipadic")}
                     | {"python": platform.python_version()},
        "cases": cases,
    }
    OUTPUT.write_text(json.dumps(document, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{OUTPUT}: {len(cases)} cases")


if __name__ == "__main__":
    main()
