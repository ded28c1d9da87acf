"""The embedded demo: tiny Llamas pretrained from scratch on the CPU, with tasks that show the phenomenon.

A seeded generator describes a small world (people, places, objects and their colours, single-digit
sums) and renders it as four llm-jp-eval tasks of four categories, scored both ways:

==============  ========  ========  ===========  =========================================
task            category  mode      metric       what the model must learn
==============  ========  ========  ===========  =========================================
demo_colors     MC        choice    exact_match  the colour of ~50 objects (knowledge)
demo_nli        NLI       choice    exact_match  negation, then comparing names and places
demo_arith      MR        generate  exact_match  the 100 single-digit sums
demo_qa         RC        generate  char_f1      copying the place of the person asked about
==============  ========  ========  ===========  =========================================

The pretraining corpus is made of documents in the same prompt layout (an instruction, then a few
solved examples), so the skills appear at different speeds during training. The learning rate stays
constant after warm-up, like the stable phase of a warmup-stable-decay schedule, so that late
checkpoints keep moving: scores are clearly above chance yet jump from one checkpoint to the next.

Two runs share the corpus, the tokenizer and the tasks, and differ in model size (``MODEL_SIZES``):
``base`` (1.1 M parameters) and ``small`` (0.3 M), so that runs can be compared side by side, as a
team compares the runs of an ablation.

Everything is seeded and torch runs with deterministic algorithms on a fixed number of threads: the
same seed gives bitwise the same checkpoints on the same machine.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ckpt_stability.atomic import atomic_directory, write_text
from ckpt_stability.prompts import PromptTemplate

log = logging.getLogger(__name__)

NAMES = ["太郎", "花子", "次郎", "健太", "美咲", "翔太", "陽菜", "大輝", "結衣", "蓮"]
PLACES = ["東京", "大阪", "京都", "札幌", "福岡", "名古屋", "仙台", "神戸", "横浜", "広島"]
COLORS = ["赤", "青", "黄", "白", "黒", "緑"]
OBJECT_COLORS = {
    "赤": ["りんご", "いちご", "トマト", "ポスト", "消防車", "さくらんぼ", "唐辛子", "夕日"],
    "青": ["空", "海", "サファイア", "地球", "湖", "青い鳥", "ジーンズ", "ブルーハワイ"],
    "黄": ["バナナ", "レモン", "ひまわり", "ひよこ", "たんぽぽ", "菜の花", "卵黄", "とうもろこし"],
    "白": ["雪", "牛乳", "砂糖", "豆腐", "雲", "塩", "白鳥", "綿"],
    "黒": ["炭", "カラス", "墨", "夜空", "タイヤ", "黒板", "のり", "黒猫"],
    "緑": ["草", "葉っぱ", "キャベツ", "ピーマン", "きゅうり", "抹茶", "カエル", "ブロッコリー"],
}
OBJECTS = [obj for objects in OBJECT_COLORS.values() for obj in objects]
COLOR_OF = {obj: color for color, objects in OBJECT_COLORS.items() for obj in objects}
NLI_LABELS = ["entailment", "contradiction", "neutral"]


@dataclass(frozen=True)
class DemoTask:
    name: str
    category: str
    mode: str
    instruction: str
    metrics: list[str]
    output_length: int
    label_list: list[str] | None
    example: Callable[[random.Random], tuple[str, str]]


def _colors_example(rng: random.Random, obj: str | None = None) -> tuple[str, str]:
    if obj is None:
        # Zipf-like frequencies: the rarer objects are learnt late, and unsteadily.
        rank = min(int(rng.paretovariate(1.0)) - 1, len(OBJECTS) - 1)
        obj = OBJECTS[rank] if rng.random() < 0.8 else rng.choice(OBJECTS)
    return f"選択肢：{'、'.join(COLORS)}\n質問：{obj}の色は何色ですか？", COLOR_OF[obj]


def _nli_example(rng: random.Random) -> tuple[str, str]:
    name, place = rng.choice(NAMES), rng.choice(PLACES)
    premise = f"前提：{name}は{place}にいます。"
    label = rng.choice(NLI_LABELS)
    if label == "entailment":
        return f"{premise}\n仮説：{name}は{place}にいます。", label
    if label == "contradiction":  # a negation: a local cue, learnt early
        return f"{premise}\n仮説：{name}は{place}にいません。", label
    other = rng.choice([n for n in NAMES if n != name])  # telling it from entailment needs the names compared
    return f"{premise}\n仮説：{other}は{place}にいます。", label


def _arith_example(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(10), rng.randrange(10)
    return f"{a}+{b}=", str(a + b)


def _qa_example(rng: random.Random) -> tuple[str, str]:
    names, places = rng.sample(NAMES, 2), rng.sample(PLACES, 2)
    asked = rng.randrange(2)
    passage = "".join(f"{n}は{p}に住んでいます。" for n, p in zip(names, places))
    return f"文章：{passage}\n質問：{names[asked]}はどこに住んでいますか？", places[asked]


TASKS = [
    DemoTask("demo_colors", "MC", "choice", "質問に対する答えを選択肢の中から選んでください。",
             ["exact_match"], 2, COLORS, _colors_example),
    DemoTask("demo_nli", "NLI", "choice",
             "前提と仮説の関係をentailment、contradiction、neutralの中から回答してください。",
             ["exact_match"], 3, NLI_LABELS, _nli_example),
    DemoTask("demo_arith", "MR", "generate", "計算をして、答えの数字のみを答えてください。",
             ["exact_match"], 3, None, _arith_example),
    DemoTask("demo_qa", "RC", "generate", "質問に対する回答を文章から抜き出してください。",
             ["char_f1"], 4, None, _qa_example),
]
TASK_NAMES = [task.name for task in TASKS]
NUM_FEW_SHOTS = 4
EXAMPLES_MIN, EXAMPLES_MAX = 3, 8
# Share of each task in the corpus: the colours are learnt fast, the others need more examples.
TASK_WEIGHTS = [1.5, 1, 2, 0.5]


def _task_pool(task: DemoTask, rng: random.Random, count: int) -> list[tuple[str, str]]:
    """Distinct solved examples, shuffled: every object for the colours, every sum for arithmetic,
    seeded draws otherwise."""
    if task.name == "demo_colors":
        pool = [_colors_example(rng, obj) for obj in OBJECTS]
    elif task.name == "demo_arith":
        pool = [(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]
    else:
        pool = list(dict.fromkeys(task.example(rng) for _ in range(count * 4)))
    rng.shuffle(pool)
    return pool


def write_tasks(directory: Path, seed: int, samples_per_task: int) -> None:
    """Write the demo tasks as llm-jp-eval dataset files ``{name}.json``; the few-shot examples are
    held out of the samples, as a train split is from a test split."""
    for offset, task in enumerate(TASKS):
        pool = _task_pool(task, random.Random(f"{seed}-tasks-{offset}"), samples_per_task + NUM_FEW_SHOTS)
        few_shots, samples = pool[:NUM_FEW_SHOTS], pool[NUM_FEW_SHOTS:NUM_FEW_SHOTS + samples_per_task]
        data = {
            "instruction": task.instruction,
            "output_length": task.output_length,
            "metrics": task.metrics,
            **({"label_list": task.label_list} if task.label_list else {}),
            "few_shots": [{"input": i, "output": o} for i, o in few_shots],
            "samples": [{"input": i, "output": o} for i, o in samples],
        }
        write_text(directory / f"{task.name}.json", json.dumps(data, ensure_ascii=False, indent=1) + "\n")


FINETUNE_TASK = "demo_colors_open"
"""The demo's fine-tuning task: an object's colour, answered in a word with no choices shown and no example,
to an instruction the corpus never shows. Its held-out objects are not in the fine-tuning data, so what the
fine-tuned model knows of their colours comes from pretraining; the format comes from fine-tuning."""
FINETUNE_INSTRUCTION = "物の色を一文字で答えてください。"
FINETUNE_PHRASINGS = ["{obj}", "{obj}の色は？"]


def write_finetune_task(directory: Path, seed: int) -> None:
    """The fine-tuning task in llm-jp-eval's layout: ``train/`` (the fine-tuning data) and ``test/`` (the
    target task), each {FINETUNE_TASK}.json, with half of each colour's objects in either split."""
    rng = random.Random(f"{seed}-finetune")
    splits: dict[str, list[str]] = {"train": [], "test": []}
    for objects in OBJECT_COLORS.values():
        shuffled = rng.sample(objects, len(objects))
        splits["train"] += shuffled[: len(objects) // 2]
        splits["test"] += shuffled[len(objects) // 2:]
    for split, objects in splits.items():
        samples = [{"input": phrasing.format(obj=obj), "output": COLOR_OF[obj]}
                   for obj in objects for phrasing in FINETUNE_PHRASINGS]
        data = {"instruction": FINETUNE_INSTRUCTION, "output_length": 3, "metrics": ["exact_match"],
                "few_shots": [], "samples": rng.sample(samples, len(samples))}
        write_text(directory / split / f"{FINETUNE_TASK}.json", json.dumps(data, ensure_ascii=False, indent=1) + "\n")


def documents(rng: random.Random, template: PromptTemplate) -> Iterator[str]:
    """The pretraining corpus: each document is one task's instruction and 1-5 solved examples."""
    while True:
        task = rng.choices(TASKS, weights=TASK_WEIGHTS)[0]
        shots = [task.example(rng) for _ in range(rng.randint(EXAMPLES_MIN, EXAMPLES_MAX))]
        yield template.context(task.instruction, shots)


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    num_layers: int


MODEL_SIZES = {"base": ModelSize(hidden_size=128, num_layers=4), "small": ModelSize(hidden_size=64, num_layers=4)}
"""The demo's runs: two models of different size trained on the same corpus, as a team compares runs."""


@dataclass(frozen=True)
class DemoSettings:
    seed: int = 0
    train_steps: int = 480
    save_every: int = 16
    samples_per_task: int = 100
    batch_size: int = 16
    seq_len: int = 256
    learning_rate: float = 1.5e-3
    warmup_steps: int = 50
    vocab_size: int = 1024
    threads: int = 2
    heldout_documents: int = 50
    tokenizer_documents: int = 3000

    def checkpoint_steps(self) -> list[int]:
        return list(range(self.save_every, self.train_steps + 1, self.save_every))


def train_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE trained on the corpus. Runs of kanji, hiragana and katakana are split apart
    before merging, so that a name or a place stays a token of its own instead of being merged into
    a whole sentence; any byte sequence can still be encoded, so real Japanese data works too."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{Han}+|\p{Hiragana}+|[\p{Katakana}ー]+"), "isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=512,
    )


def build_model(size: ModelSize, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=4 * size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def write_data(output: Path, settings: DemoSettings) -> None:
    """The data every demo run shares: ``tasks/``, ``finetune/``, ``heldout.txt`` and the trained
    ``tokenizer/``."""
    template = PromptTemplate()
    write_tasks(output / "tasks", settings.seed, settings.samples_per_task)
    write_finetune_task(output / "finetune", settings.seed)
    heldout = documents(random.Random(f"{settings.seed}-heldout"), template)
    write_text(output / "heldout.txt", "\n\n".join(next(heldout) for _ in range(settings.heldout_documents)) + "\n")
    corpus = documents(random.Random(f"{settings.seed}-corpus"), template)
    tokenizer = train_tokenizer([next(corpus) for _ in range(settings.tokenizer_documents)], settings.vocab_size)
    with atomic_directory(output / "tokenizer") as tmp:
        tokenizer.save_pretrained(tmp)


def train_run(data: Path, output: Path, settings: DemoSettings, size: ModelSize) -> dict:
    """Pretrain one model on the demo corpus; write ``{output}/checkpoint-{step}/`` every save_every steps."""
    import torch
    from transformers import AutoTokenizer

    from ckpt_stability.backends.transformers import no_progress_bars

    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(settings.threads)
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    corpus = documents(random.Random(f"{settings.seed}-corpus"), PromptTemplate())
    for _ in range(settings.tokenizer_documents):  # the tokenizer's documents come first; training goes on
        next(corpus)
    tokens_needed = settings.train_steps * settings.batch_size * settings.seq_len
    stream: list[int] = []
    while len(stream) < tokens_needed:
        batch = [next(corpus) for _ in range(512)]
        # verbose=False: no warning that a document is longer than model_max_length; the stream is cut
        # into seq_len windows below
        for ids in tokenizer(batch, add_special_tokens=True, verbose=False)["input_ids"]:
            stream.extend(ids + [tokenizer.eos_token_id])
    data_tensor = torch.tensor(stream[:tokens_needed]).view(settings.train_steps, settings.batch_size,
                                                             settings.seq_len)

    model = build_model(size, len(tokenizer))
    parameters = sum(p.numel() for p in model.parameters())
    log.info("demo model: %d parameters, %d training tokens", parameters, tokens_needed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=0.01)
    model.train()
    for step in range(1, settings.train_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * min(1.0, step / settings.warmup_steps)
        batch = data_tensor[step - 1]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % settings.save_every == 0:
            with atomic_directory(output / f"checkpoint-{step}") as tmp, no_progress_bars():
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
            log.info("step %d: loss %.4f (%.0f s)", step, loss.item(), time.perf_counter() - started)
    summary = {"parameters": parameters, "train_tokens": tokens_needed,
               "seconds": round(time.perf_counter() - started, 1), "final_loss": round(loss.item(), 4)}
    log.info("demo pretraining done: %s", summary)
    return summary


def pretrain(output: Path, settings: DemoSettings, size: ModelSize = MODEL_SIZES["base"]) -> dict:
    """The data and one run: ``tasks/``, ``heldout.txt``, ``tokenizer/`` and ``checkpoints/`` under
    ``output``."""
    write_data(output, settings)
    return train_run(output, output / "checkpoints", settings, size)
