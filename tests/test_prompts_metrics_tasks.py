"""Prompt layout, per-example metrics and llm-jp-eval task files."""

import json
from pathlib import Path

import pytest

from ckpt_stability.errors import InputError
from ckpt_stability.metrics import METRICS, char_f1, exact_match, normalize, score_examples, set_f1
from ckpt_stability.prompts import PromptTemplate
from ckpt_stability.tasks import load_task

JGLUE = Path(__file__).parent / "data" / "jglue"


# ---------------------------------------------------------------- prompts


def test_llm_jp_eval_layout_with_two_few_shots():
    prompt = PromptTemplate().render("質問に答えてください。", [("1+1=", "2"), ("2+2=", "4")], "3+4=")
    assert prompt == (
        "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n"
        "\n"
        "### 指示:\n"
        "質問に答えてください。\n"
        "\n"
        "### 入力:\n"
        "1+1=\n"
        "\n"
        "### 応答:\n"
        "2\n"
        "\n"
        "### 入力:\n"
        "2+2=\n"
        "\n"
        "### 応答:\n"
        "4\n"
        "\n"
        "### 入力:\n"
        "3+4=\n"
        "\n"
        "### 応答:\n"
    )


def test_custom_template_and_braces_in_text():
    template = PromptTemplate(header="Task: {instruction}", example="\nQ: {input}\nA: {output}")
    assert template.render("Add.", [("{x}+1", "{y}")], "2+2") == "Task: Add.\nQ: {x}+1\nA: {y}\nQ: 2+2\nA: "


def test_template_must_keep_its_placeholders():
    with pytest.raises(ValueError, match="header"):
        PromptTemplate(header="no instruction")
    with pytest.raises(ValueError, match="end with"):
        PromptTemplate(example="{output} then {input}")


def test_task_prompts_use_the_first_few_shots_and_are_stable():
    task = load_task(JGLUE / "jnli.json", num_fewshot=2)
    prompts = task.prompts(PromptTemplate())
    assert len(prompts) == len(task.samples) == 24
    file_shots = json.loads((JGLUE / "jnli.json").read_text("utf-8"))["few_shots"]
    assert [shot.input for shot in task.few_shots] == [shot["input"] for shot in file_shots[:2]]
    assert file_shots[0]["input"] in prompts[0] and file_shots[1]["input"] in prompts[0]
    assert file_shots[2]["input"] not in prompts[0]
    assert prompts[5].endswith(task.samples[5].input + "\n\n### 応答:\n")
    assert prompts == load_task(JGLUE / "jnli.json", num_fewshot=2).prompts(PromptTemplate())
    assert PromptTemplate().digest() == PromptTemplate().digest()
    assert PromptTemplate().digest() != PromptTemplate(header="x {instruction}").digest()


# ---------------------------------------------------------------- metrics


def test_exact_match_normalizes_without_stripping():
    # as llm-jp-eval: the answer is stripped when extracted (extract_answer), the gold never is
    assert exact_match("entailment", "entailment") == 1.0
    assert exact_match("entailment", "entailment\n") == 0.0
    assert exact_match("３", "3") == 1.0  # NFKC: full-width digit
    assert exact_match("neutral", "entailment") == 0.0
    assert normalize("  ＡＢＣ　") == "  ABC "


def test_char_f1_hand_computed():
    # Indel similarity of the token-sorted strings, 1 - distance / (len1 + len2), as a whole percentage
    assert char_f1("東京都", "東京") == pytest.approx(1 - 1 / 5)
    assert char_f1("def abc", "abc def") == 1.0  # token order does not matter
    assert char_f1("大阪", "東京") == 0.0
    assert char_f1("abcd", "abxy") == pytest.approx(1 - 4 / 8)


def test_set_f1_hand_computed():
    assert set_f1("a\nb\nc", "b\nc\nd") == pytest.approx(2 / 3)  # precision 2/3, recall 2/3
    assert set_f1("a\nb", "a\nb\nc\nd") == pytest.approx(2 * 1 * 0.5 / 1.5)  # precision 1, recall 1/2
    assert set_f1("x", "a\nb") == 0.0
    assert set_f1(" b \na", "a\nb") == 1.0


def test_bleu_hand_computed():
    # llm-jp-eval's BLEU compares the strings character by character: 3 of the 4 non-space characters
    # match their counterpart (a space is an empty segment); brevity penalty 1
    assert METRICS["bleu"]("a b c d", "a b c e") == pytest.approx(0.75)
    assert METRICS["bleu"]("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert METRICS["bleu_ja"]("猫が座った", "猫が座った") == pytest.approx(1.0)


def test_score_examples():
    assert score_examples("exact_match", ["a", "b"], ["a", "c"]) == [1.0, 0.0]
    with pytest.raises(ValueError):
        score_examples("exact_match", ["a"], ["a", "b"])


# ---------------------------------------------------------------- task files


def test_real_jglue_tasks_load():
    jcqa = load_task(JGLUE / "jcommonsenseqa.json", category="MC", num_fewshot=4)
    assert jcqa.mode == "choice" and jcqa.label_list == ("0", "1", "2", "3", "4")
    assert jcqa.metric == "exact_match" and len(jcqa.samples) == 24 and len(jcqa.few_shots) == 4
    jsquad = load_task(JGLUE / "jsquad.json", mode="generate", max_samples=5)
    assert jsquad.metric == "char_f1" and len(jsquad.samples) == 5 and jsquad.label_list is None
    assert len(jcqa.sha256) == 64


def write_task(tmp_path, **overrides) -> Path:
    data = {"instruction": "答えて", "output_length": 3, "metrics": ["exact_match"],
            "label_list": ["yes", "no"], "few_shots": [{"input": "q0", "output": "yes"}],
            "samples": [{"input": "q1", "output": "no"}, {"input": "q2", "output": "yes"}]}
    data.update(overrides)
    data = {key: value for key, value in data.items() if value is not None}
    path = tmp_path / "task.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("overrides, message", [
    ({"samples": []}, "samples is empty"),
    ({"instruction": None}, "missing key(s) instruction"),
    ({"metrics": ["rouge9"]}, "unknown metric(s) rouge9"),
    ({"output_length": 0}, "output_length must be a positive integer"),
    ({"samples": [{"input": "q1"}]}, "samples[0] must be an object with string fields input and output"),
    ({"samples": [{"input": "q1", "output": "no"}, {"input": "q2", "output": "maybe"}]},
     "samples[1] has output 'maybe', which is not in label_list"),
    ({"few_shots": [{"input": "q0", "output": "perhaps"}]}, "few_shots[0] has output 'perhaps'"),
])
def test_bad_task_files_name_the_file_and_the_problem(tmp_path, overrides, message):
    path = write_task(tmp_path, **overrides)
    with pytest.raises(InputError) as error:
        load_task(path, mode="choice")
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_choice_needs_label_list(tmp_path):
    path = write_task(tmp_path, label_list=None)
    assert load_task(path, num_fewshot=1).mode == "generate"  # auto
    with pytest.raises(InputError, match=r"task.json: scoring mode 'choice' needs a label_list"):
        load_task(path, mode="choice")


def test_too_many_few_shots(tmp_path):
    with pytest.raises(InputError, match="num_fewshot is 3 but the file has only 1 few_shots"):
        load_task(write_task(tmp_path), num_fewshot=3)


def test_invalid_json_and_bytes(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"instruction": "x",\n "samples": [}')
    with pytest.raises(InputError, match=r"broken.json: invalid JSON at line 2, column 14"):
        load_task(broken)
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"instruction": "caf'.encode() + b"\xe9" + b'"}')
    with pytest.raises(InputError, match=r"latin.json: not UTF-8 \(invalid byte at offset 20\)"):
        load_task(latin)
    with pytest.raises(InputError, match="cannot read task file"):
        load_task(tmp_path / "absent.json")
