"""IFEval: verifiable instructions. Metrics as in the paper: prompt-level (every instruction of a
prompt followed) and instruction-level accuracy, strict and loose (``posttrain.rewards.ifeval``)."""

from __future__ import annotations

from posttrain.eval.tasks.base import Task, field_of
from posttrain.rewards import ifeval as verifier


def instance(raw: dict, where: str) -> dict:
    return {"id": raw.get("key", raw.get("id")), "prompt": [{"role": "user", "content": field_of(raw, "prompt", where)}],
            "text": raw["prompt"],
            "ground_truth": {"instruction_id_list": field_of(raw, "instruction_id_list", where, list),
                             "kwargs": field_of(raw, "kwargs", where, list)}}


def score(output: str, inst: dict) -> dict:
    strict, loose = verifier.followed(output, inst["ground_truth"]), verifier.followed(output, inst["ground_truth"], loose=True)
    return {"score": float(all(strict)), "extracted": None, "strict": strict, "loose": loose}


def metrics(samples: list[dict]) -> dict:
    inst = lambda key: [x for s in samples for x in s[key]]  # noqa: E731
    return {"prompt_level_strict_acc": sum(all(s["strict"]) for s in samples) / len(samples),
            "inst_level_strict_acc": sum(inst("strict")) / max(len(inst("strict")), 1),
            "prompt_level_loose_acc": sum(all(s["loose"]) for s in samples) / len(samples),
            "inst_level_loose_acc": sum(inst("loose")) / max(len(inst("loose")), 1)}


TASK = Task("ifeval", ("google/IFEval", None, "train"), instance, score, max_new_tokens=1024, metrics=metrics,
            description="IFEval, prompt- and instruction-level accuracy, strict and loose")
