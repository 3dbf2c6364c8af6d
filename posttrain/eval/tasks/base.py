"""What a task is: where its data comes from, how an instance becomes a prompt, how an output is scored."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from posttrain.data.io import read_records
from posttrain.errors import UserError


@dataclass(frozen=True)
class Task:
    name: str
    hub: tuple[str, str | None, str]  # default source: (dataset id, configuration, split)
    # raw record, place -> {"id", "prompt", "ground_truth", "text" (the item as its authors wrote it), ...}
    instance: Callable[[dict, str], dict] | None = None
    score: Callable[[str, dict], dict] | None = None  # output, instance -> {"score": float, "extracted": ..., ...}
    kind: str = "generate"  # generate | loglikelihood | judge | rag
    max_new_tokens: int = 512
    samples: int = 1  # completions per instance (pass@k tasks sample more)
    temperature: float = 0.0
    metrics: Callable[[list[dict]], dict] | None = None  # samples -> {metric: value}; default: mean score
    description: str = ""
    defaults: dict = field(default_factory=dict)
    # path or None -> instances, for data whose records are not one instance each (rag_facts: facts)
    loader: Callable[[str | None], list[dict]] | None = None

    def __hash__(self) -> int:
        return hash(self.name)


def load(task: Task, path: str | None, limit: int | None) -> list[dict]:
    """The task's instances from ``path`` (a local file or hub id) or its hub dataset, first ``limit``."""
    if task.loader:
        out = task.loader(path)[:limit] if limit else task.loader(path)
        return [{**inst, "index": i} for i, inst in enumerate(out)]
    source, name, split = (path, None, "train") if path else task.hub
    if not source:
        raise UserError(f"task {task.name} has no default dataset: give --data {task.name}=PATH")
    out = []
    for raw, where in read_records(source, split, name):
        inst = task.instance(raw, where)
        inst.setdefault("index", len(out))
        out.append(inst)
        if limit and len(out) >= limit:
            break
    if not out:
        raise UserError(f"{source}: no records for task {task.name}")
    return out


def field_of(raw: dict, key: str, where: str, kind: type = str):
    if key not in raw:
        raise UserError(f"{where}: field '{key}' is missing")
    if not isinstance(raw[key], kind):
        raise UserError(f"{where}: field '{key}' must be a {kind.__name__}, got {type(raw[key]).__name__}")
    return raw[key]
