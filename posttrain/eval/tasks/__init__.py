"""Evaluation tasks and suites, in one place.

A task = a loader (a local file, or its hub dataset by default), a prompt format and a scorer that
reuses the verifiers. ``TASKS[name]`` is the task; ``SUITES`` names the task lists of the dev suite
(what recipes are tuned on) and the unseen suite (kept for the final report).
"""

from __future__ import annotations

from posttrain.errors import UserError
from posttrain.eval.tasks import gsm8k, humaneval, ifeval, judge_winrate, math500, mc, rag_facts, verifiable
from posttrain.eval.tasks.base import Task

TASKS: dict[str, Task] = {t.name: t for t in (gsm8k.ZERO_SHOT, gsm8k.FEW_SHOT, math500.TASK, ifeval.TASK, humaneval.TASK,
                                              mc.TASK, judge_winrate.TASK, verifiable.TASK,
                                              rag_facts.TASK)}
SUITES: dict[str, list[str]] = {
    "dev": ["gsm8k", "math500", "ifeval", "humaneval"],
    "unseen": ["gsm8k_fewshot", "mc", "judge_winrate"],
}


def resolve_tasks(names: list[str]) -> list[Task]:
    out = []
    for name in names:
        if name.startswith("suite:") or name in SUITES:
            suite = name.removeprefix("suite:")
            if suite not in SUITES:
                raise UserError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
            out += [TASKS[t] for t in SUITES[suite]]
        elif name in TASKS:
            out.append(TASKS[name])
        else:
            raise UserError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}; suites: {', '.join(SUITES)}")
    return list(dict.fromkeys(out))
