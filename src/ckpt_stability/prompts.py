"""Few-shot prompts in llm-jp-eval's layout.

A prompt is the header (the task's instruction), then the first ``num_fewshot`` few-shot examples, then
the sample's input followed by the response heading, where the model's answer starts::

    以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。

    ### 指示:
    {instruction}

    ### 入力:
    {few-shot input}

    ### 応答:
    {few-shot output}

    ### 入力:
    {sample input}

    ### 応答:

The two parts are configurable (``prompt.header`` with ``{instruction}``; ``prompt.example`` with
``{input}`` and ending in ``{output}``): the query is the example with an empty output.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

LLM_JP_EVAL_HEADER = (
    "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
    "\n\n### 指示:\n{instruction}"
)
LLM_JP_EVAL_EXAMPLE = "\n\n### 入力:\n{input}\n\n### 応答:\n{output}"


@dataclass(frozen=True)
class PromptTemplate:
    header: str = LLM_JP_EVAL_HEADER
    example: str = LLM_JP_EVAL_EXAMPLE

    def __post_init__(self):
        if "{instruction}" not in self.header:
            raise ValueError("prompt.header must contain {instruction}")
        if "{input}" not in self.example or not self.example.endswith("{output}"):
            raise ValueError("prompt.example must contain {input} and end with {output}")

    def context(self, instruction: str, few_shots: list[tuple[str, str]]) -> str:
        """Everything before the sample: header and few-shot examples (shared by all samples)."""
        text = self.header.format(instruction=instruction)
        for shot_input, shot_output in few_shots:
            text += self.example.format(input=shot_input, output=shot_output)
        return text

    def query(self, sample_input: str) -> str:
        return self.example.format(input=sample_input, output="")

    def render(self, instruction: str, few_shots: list[tuple[str, str]], sample_input: str) -> str:
        return self.context(instruction, few_shots) + self.query(sample_input)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), ensure_ascii=False).encode()).hexdigest()


def prompts_digest(prompts: list[str]) -> str:
    """One hash over a task's rendered prompts: equal for every checkpoint evaluated on them."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()
