"""Judge-based win rate (AlpacaEval style): the model's answer against a reference answer, judged
pairwise by an LLM behind any OpenAI-compatible endpoint (``--judge openai:<model>@<base_url>``).

Records: ``{"instruction", "output"}`` (the reference answer; AlpacaEval's ``alpaca_eval`` set by
default). For each instance the two answers are shown in a seeded random order (so position bias
cancels out on average); the judge answers ``A`` or ``B``. Win = 1 when the judge prefers the model's
answer, 0 when it prefers the reference, 0.5 when its verdict cannot be parsed (counted apart).
``win_rate`` is the mean. Without a judge endpoint the task is skipped, and the results say so.
"""

from __future__ import annotations

import random
import re

from posttrain.eval.tasks.base import Task, field_of

JUDGE_PROMPT = """You are comparing two answers to the same instruction. Judge which answer is more helpful, \
correct and clear. Reply with a single letter: A or B.

# Instruction
{instruction}

# Answer A
{a}

# Answer B
{b}

Which answer is better? Reply with A or B."""
_VERDICT = re.compile(r"\b([AB])\b")


def instance(raw: dict, where: str) -> dict:
    instruction = field_of(raw, "instruction", where)
    return {"id": raw.get("id"), "prompt": [{"role": "user", "content": instruction}], "instruction": instruction,
            "text": instruction, "ground_truth": field_of(raw, "output", where)}


def judge_prompts(samples: list[dict], seed: int) -> list[tuple[list[dict], bool]]:
    """Judge messages per sample and whether the model's answer is shown first (``A``)."""
    out = []
    for s in samples:
        first = random.Random(f"{seed}:{s['index']}").random() < 0.5
        a, b = (s["output"], s["ground_truth"]) if first else (s["ground_truth"], s["output"])
        text = JUDGE_PROMPT.format(instruction=s["instruction"], a=a, b=b)
        out.append(([{"role": "user", "content": text}], first))
    return out


def verdict(judge_text: str, model_first: bool) -> tuple[float, str | None]:
    m = _VERDICT.search(judge_text.strip())
    if not m:
        return 0.5, None
    return float((m.group(1) == "A") == model_first), m.group(1)


def metrics(samples: list[dict]) -> dict:
    return {"win_rate": sum(s["score"] for s in samples) / len(samples),
            "unparsed_verdicts": sum(s["verdict"] is None for s in samples) / len(samples)}


TASK = Task("judge_winrate", ("tatsu-lab/alpaca_eval", "alpaca_eval", "eval"), instance, kind="judge",
            max_new_tokens=512, metrics=metrics, description="pairwise win rate against reference answers, LLM judge")
