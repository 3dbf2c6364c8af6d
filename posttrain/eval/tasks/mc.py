"""Multiple choice by log-likelihood (MMLU-style): the option whose text the model finds most likely
after the question wins. Any file with ``question``, ``choices`` (a list of strings) and ``answer``
(an index, or a letter A-Z) works; the default is MMLU's test split.

Metrics: ``acc`` (highest summed log-probability of the option's tokens) and ``acc_norm`` (highest
log-probability per option character, as lm-evaluation-harness normalises).
"""

from __future__ import annotations

from posttrain.errors import UserError
from posttrain.eval.tasks.base import Task, field_of


def instance(raw: dict, where: str) -> dict:
    choices = field_of(raw, "choices", where, list)
    if not choices or not all(isinstance(c, str) for c in choices):
        raise UserError(f"{where}: field 'choices' must be a non-empty list of strings")
    answer = raw.get("answer")
    if isinstance(answer, str) and len(answer) == 1 and answer.isalpha():
        answer = ord(answer.upper()) - ord("A")
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise UserError(f"{where}: field 'answer' must be an index into 'choices' (or a letter), got {raw.get('answer')!r}")
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    question = field_of(raw, "question", where) + "\n" + "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(choices))
    return {"id": raw.get("id"), "prompt": [{"role": "user", "content": question + "\nAnswer:"}], "choices": choices,
            "ground_truth": answer, "subject": raw.get("subject"), "text": question}


def metrics(samples: list[dict]) -> dict:
    return {"acc": sum(s["score"] for s in samples) / len(samples),
            "acc_norm": sum(s["correct_norm"] for s in samples) / len(samples)}


TASK = Task("mc", ("cais/mmlu", "all", "test"), instance, kind="loglikelihood", metrics=metrics,
            description="multiple choice by option log-likelihood (acc, acc_norm)")
