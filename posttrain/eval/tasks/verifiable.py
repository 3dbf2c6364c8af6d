"""Any file of verifiable prompts as an evaluation set: records ``{"messages", "ground_truth",
"verifier"}`` (the RLVR format, e.g. the held-out sets of ``posttrain data arithmetic``), asked as they
are and scored by the verifier each record names. Metric: ``accuracy`` (mean score), and per verifier
when there are several."""

from __future__ import annotations

from posttrain.data.records import verifiable_record
from posttrain.eval.tasks.base import Task
from posttrain.rewards import get_verifier, gsm8k, math

EXTRACTORS = {"gsm8k": gsm8k.extract, "math": math.extract}


def instance(raw: dict, where: str) -> dict:
    rec = verifiable_record(raw, where)
    get_verifier(rec["verifier"])
    return {"id": rec.get("id"), "prompt": rec["messages"], "ground_truth": rec["ground_truth"], "verifier": rec["verifier"],
            "text": "\n".join(m["content"] for m in rec["messages"] if m["role"] == "user")}


def score(output: str, inst: dict) -> dict:
    extract = EXTRACTORS.get(inst["verifier"].lower())
    return {"score": float(get_verifier(inst["verifier"])(output, inst["ground_truth"])),
            "extracted": extract(output) if extract else None, "verifier": inst["verifier"]}


def metrics(samples: list[dict]) -> dict:
    out = {"accuracy": sum(s["score"] for s in samples) / len(samples)}
    names = sorted({s["verifier"] for s in samples})
    if len(names) > 1:
        for name in names:
            mine = [s["score"] for s in samples if s["verifier"] == name]
            out[f"accuracy/{name}"] = sum(mine) / len(mine)
    return out


TASK = Task("verifiable", ("", None, "train"), instance, score, max_new_tokens=256, metrics=metrics,
            description="verifiable prompts from a file (--data verifiable=PATH), scored by their verifiers")
