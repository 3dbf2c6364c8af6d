"""MATH-500: competition math; the answer in ``\\boxed{}``, equivalence by math-verify (``math`` verifier)."""

from __future__ import annotations

from posttrain.data.adapters import math_answer
from posttrain.eval.tasks.base import Task, field_of
from posttrain.rewards import math as verifier

INSTRUCTION = "\nSolve the problem. Put your final answer within \\boxed{}."


def instance(raw: dict, where: str) -> dict:
    problem = field_of(raw, "problem", where)
    question = problem + INSTRUCTION
    return {"id": raw.get("unique_id", raw.get("id")), "prompt": [{"role": "user", "content": question}],
            "ground_truth": math_answer(raw, where), "subject": raw.get("subject"), "level": raw.get("level"), "text": problem}


def score(output: str, inst: dict) -> dict:
    return {"score": verifier.score(output, inst["ground_truth"]), "extracted": verifier.extract(output)}


TASK = Task("math500", ("HuggingFaceH4/MATH-500", None, "test"), instance, score, max_new_tokens=1024,
            description="MATH-500, boxed answer, math-verify equivalence")
