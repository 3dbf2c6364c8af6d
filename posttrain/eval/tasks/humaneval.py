"""HumanEval: Python functions checked by their tests in the sandbox (``code`` verifier).

The prompt is the function's signature and docstring; the model continues it (the raw completion is
appended to the prompt) or writes the whole function (recognised by ``def <entry_point>(``). pass@k
is the unbiased estimator of Chen et al. (2021): ``1 - C(n - c, k) / C(n, k)`` per problem with ``n``
samples of which ``c`` pass, averaged over problems; ``samples`` > 1 uses temperature 0.8.
"""

from __future__ import annotations

from math import comb

from posttrain.data.adapters import HUMANEVAL_INSTRUCTION
from posttrain.eval.tasks.base import Task, field_of
from posttrain.rewards import code as verifier


def instance(raw: dict, where: str) -> dict:
    code = field_of(raw, "prompt", where)
    return {"id": raw.get("task_id", raw.get("id")), "prompt": [{"role": "user", "content": HUMANEVAL_INSTRUCTION + code}],
            "ground_truth": {"test": field_of(raw, "test", where), "entry_point": field_of(raw, "entry_point", where),
                             "prompt": code}, "text": code}


def score(output: str, inst: dict) -> dict:
    return {"score": verifier.score(output, inst["ground_truth"]), "extracted": None}


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def metrics(samples: list[dict]) -> dict:
    by_problem: dict = {}
    for s in samples:
        by_problem.setdefault(s["index"], []).append(s["score"])
    n = min(len(v) for v in by_problem.values())
    out = {}
    for k in (1, 10, 100):
        if k <= n:
            out[f"pass@{k}"] = sum(pass_at_k(len(v), int(sum(v)), k) for v in by_problem.values()) / len(by_problem)
    return out


TASK = Task("humaneval", ("openai/openai_humaneval", None, "test"), instance, score, max_new_tokens=512, metrics=metrics,
            description="HumanEval, sandboxed tests, unbiased pass@k")
