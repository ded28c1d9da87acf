"""Scoring and task loading as llm-jp-eval (v1.x) does them.

The metrics are checked against data/llm_jp_eval/expected_metrics.json, which make_expected.py computes
with the reference libraries themselves (fuzzywuzzy + python-Levenshtein, sacrebleu): tricky cases and
~400 JSQuAD-like answer variants. Every value must be equal, not merely close.
"""

import json
import logging
from pathlib import Path

import pytest

from ckpt_stability.errors import InputError
from ckpt_stability.metrics import METRICS, char_f1, extract_answer, set_f1
from ckpt_stability.prompts import PromptTemplate
from ckpt_stability.tasks import load_task

EXPECTED = json.loads((Path(__file__).parent / "data" / "llm_jp_eval" / "expected_metrics.json").read_text("utf-8"))
CASES = EXPECTED["cases"]
# The reference's scale of each metric (see "scale" in the JSON) over ours, which is [0, 1] throughout.
REFERENCE_SCALE = {"exact_match": 1, "char_f1": 100, "set_f1": 1, "bleu_en": 100, "bleu_ja": 100}


def test_the_table_covers_the_tricky_groups_and_the_jsquad_variants():
    groups = {case["group"] for case in CASES}
    assert {"brackets", "latin1", "empty", "whitespace", "lines", "multiline", "ties", "width"} <= groups
    assert sum(case["group"] == "jsquad" for case in CASES) >= 400


def test_answers_are_extracted_as_llm_jp_eval_does():
    wrong = [(case["id"], case["generated"]) for case in CASES if extract_answer(case["generated"]) != case["answer"]]
    assert wrong == []


@pytest.mark.parametrize("metric", REFERENCE_SCALE)
def test_metric_equals_the_reference_on_every_case(metric):
    ours = [METRICS[metric](case["answer"], case["gold"]) for case in CASES]
    wrong = [(case["id"], case["answer"], case["gold"], score, case["expected"][metric])
             for case, score in zip(CASES, ours) if score != case["expected"][metric] / REFERENCE_SCALE[metric]]
    assert wrong == []


def test_extract_answer():
    assert extract_answer(" 東京\n\n理由: 首都") == "東京"
    assert extract_answer("ＡＢＣ　\n") == "ABC"  # NFKC, then strip
    assert extract_answer("\n\n東京") == ""
    assert extract_answer("a\nb") == "a\nb"  # one newline is part of the answer


def test_char_f1_processes_before_comparing():
    assert char_f1("「東京」", "東京") == 1.0  # punctuation becomes space
    assert char_f1("Tokyo Tower", "tower TOKYO") == 1.0  # lower-cased, tokens sorted
    assert char_f1("「」", "") == 1.0  # both process to nothing: equal
    assert char_f1("", "東京") == 0.0
    assert char_f1("café", "cafe") == 0.86  # é (U+00E9) is dropped: "caf" against "cafe"
    assert char_f1("a" + "x" * 14, "a") == 0.12  # 100 * 2/16 = 12.5 rounds half to even
    assert char_f1("abcde" + "x" * 6, "abcde") == 0.62  # 62.5


def test_set_f1_counts_a_predicted_item_once():
    assert set_f1("a", "a\na") == pytest.approx(2 / 3)  # precision 1, recall 1/2
    assert set_f1("a\na", "a") == 1.0
    assert set_f1("b \na", "a\nb") == 1.0


def test_bleu_scores_characters_position_by_position():
    # llm-jp-eval's call makes each character a segment; a prefix of the gold scores 100
    assert METRICS["bleu_en"]("abc", "abcdef") == pytest.approx(1.0)
    assert METRICS["bleu_en"]("xbc", "abc") == pytest.approx(2 / 3)
    assert METRICS["bleu_ja"]("", "猫") == 0.0
    assert METRICS["bleu"]("xbc", "abc") == METRICS["bleu_en"]("xbc", "abc")  # the older name


# ---------------------------------------------------------------- task files as llm-jp-eval lays them out


def write(path: Path, samples: int, few_shots: int | None = None, metrics=("char_f1",)) -> Path:
    data = {"instruction": "答えて", "output_length": 8, "metrics": list(metrics),
            "samples": [{"input": f"{path.parent.name} q{i}", "output": f"a{i}"} for i in range(samples)]}
    if few_shots is not None:
        data["few_shots"] = [{"input": f"own q{i}", "output": f"a{i}"} for i in range(few_shots)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture
def dataset(tmp_path) -> Path:
    """llm-jp-eval's layout: evaluation/{train,dev,test}/<task>.json, the evaluation files without few_shots."""
    root = tmp_path / "evaluation"
    write(root / "train" / "qa.json", samples=6)
    write(root / "dev" / "qa.json", samples=3, few_shots=0)
    write(root / "test" / "qa.json", samples=3)
    return root


@pytest.mark.parametrize("split", ["dev", "test"])
def test_auto_takes_the_first_train_samples_when_the_file_has_too_few(dataset, split):
    task = load_task(dataset / split / "qa.json")
    assert task.num_fewshot == 4  # the project-wide default
    assert task.few_shot_path == dataset / "train" / "qa.json"
    assert [shot.input for shot in task.few_shots] == ["train q0", "train q1", "train q2", "train q3"]
    prompt = task.prompts(PromptTemplate())[0]
    assert "train q3" in prompt and "train q4" not in prompt


def test_auto_keeps_the_files_own_few_shots_when_it_has_enough(dataset):
    path = write(dataset / "dev" / "qa.json", samples=3, few_shots=5)
    task = load_task(path)
    assert task.few_shot_path == path and [shot.input for shot in task.few_shots] == [f"own q{i}" for i in range(4)]
    assert load_task(path, few_shot_source="train").few_shot_path == dataset / "train" / "qa.json"
    assert load_task(dataset / "test" / "qa.json", num_fewshot=0).few_shots == ()


def test_a_linked_task_file_takes_the_train_file_beside_its_target(dataset, tmp_path):
    link = tmp_path / "my-qa.json"
    link.symlink_to(dataset / "dev" / "qa.json")
    assert load_task(link).few_shot_path == dataset / "train" / "qa.json"


@pytest.mark.parametrize("split, kwargs, message", [
    ("dev", {"few_shot_source": "file"}, "{dev}: num_fewshot is 4 but the file has only 0 few_shots"),
    ("dev", {"num_fewshot": 7}, "{dev}: num_fewshot is 7 but the file has only 0 few_shots and {train} has only 6 samples"),
    ("dev", {"num_fewshot": 7, "few_shot_source": "train"}, "{dev}: num_fewshot is 7 but {train} has only 6 samples"),
    ("other", {}, "{other}: num_fewshot is 4 but the file has only 0 few_shots, and outside a dev/ or test/ folder "
                  "no ../train/qa.json is used"),
])
def test_too_few_few_shots_names_the_places_looked_in(dataset, split, kwargs, message):
    write(dataset / "other" / "qa.json", samples=2, few_shots=0)
    with pytest.raises(InputError) as error:
        load_task(dataset / split / "qa.json", **kwargs)
    paths = {"dev": dataset / "dev" / "qa.json", "other": dataset / "other" / "qa.json",
             "train": dataset / "train" / "qa.json"}
    assert str(error.value) == message.format(**paths)


def test_a_missing_train_file_is_named(dataset):
    (dataset / "train" / "qa.json").unlink()
    with pytest.raises(InputError, match=r"dev/qa.json: num_fewshot is 4 but the file has only 0 few_shots and "
                                         r".*train/qa.json does not exist"):
        load_task(dataset / "dev" / "qa.json")
    with pytest.raises(InputError, match=r"few_shot_source 'both' is not one of auto, file, train"):
        load_task(dataset / "dev" / "qa.json", few_shot_source="both")


def test_train_few_shots_must_be_labels_of_a_choice_task(dataset):
    path = dataset / "dev" / "qa.json"
    data = json.loads(path.read_text("utf-8"))
    path.write_text(json.dumps({**data, "label_list": ["a0", "a1", "a2"]}), encoding="utf-8")
    with pytest.raises(InputError) as error:
        load_task(path)
    assert str(error.value).startswith(f"{dataset / 'train' / 'qa.json'}: samples[3] has output 'a3'")


def test_metrics_computed_elsewhere_are_skipped_with_one_warning(dataset, caplog):
    path = write(dataset / "dev" / "mt.json", samples=2, few_shots=4,
                 metrics=("comet_wmt22", "bleu_ja", "bert_score_ja_f1", "char_f1"))
    with caplog.at_level(logging.WARNING, logger="ckpt_stability.tasks"):
        task = load_task(path)
    assert task.metric == "bleu_ja"
    assert task.metrics == ("comet_wmt22", "bleu_ja", "bert_score_ja_f1", "char_f1")
    assert [record.getMessage() for record in caplog.records] == [
        f"{path}: skipping metric(s) comet_wmt22, bert_score_ja_f1, not computed here; the task is scored by bleu_ja"]


def test_a_task_without_any_computable_metric_is_refused(dataset):
    path = write(dataset / "dev" / "jsts.json", samples=2, few_shots=4, metrics=("pearson", "spearman"))
    with pytest.raises(InputError) as error:
        load_task(path)
    assert str(error.value) == f"{path}: unknown metric(s) pearson, spearman; supported: {', '.join(METRICS)}"
