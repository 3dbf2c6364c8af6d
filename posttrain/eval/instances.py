"""The evaluation items that decontamination checks training data against, as ``EvalInstance``s."""

from __future__ import annotations

from posttrain.data.decontam import EvalInstance
from posttrain.eval.tasks import resolve_tasks
from posttrain.eval.tasks.base import load


def eval_instances(against: list[str]) -> list[EvalInstance]:
    """Instances of the evaluation sets named by ``against``: suites (``suite:dev``), tasks
    (``gsm8k``, loaded from the hub) and tasks with a local file (``gsm8k=PATH``). A task named with a
    file anywhere in the list uses that file wherever it appears."""
    paths = dict(a.split("=", 1) for a in against if "=" in a)
    names = [a.split("=", 1)[0] for a in against]
    out = []
    for task in resolve_tasks(names):
        for inst in load(task, paths.get(task.name), None):
            out.append(EvalInstance(task.name, inst["index"], inst.get("id"), inst["text"]))
    return out
