"""Step-by-step solutions and self-consistency filtering (Tulu 3's synthetic math, after Wang et al. 2023).

``solve``: ``samples`` solutions per prompt from an engine, each with its answer extracted by the
verifier's own extractor (``gsm8k``: the final number; ``math``: the last ``\\boxed{}``).

``vote``: the answers of a prompt's ``N`` solutions are grouped into classes of equal answers (as
numbers for ``gsm8k``; by math-verify equivalence for ``math``, each answer joining the first class
whose representative it equals); the majority class is the largest (the earliest on ties), and its
share is ``|majority| / N`` (solutions without an answer count in ``N``). A prompt is kept when the
share is at least ``min_agreement``; its kept solutions are those of the majority class, and its
majority answer becomes the ground truth for RLVR. When prompts carry a ground truth, the report
also gives how often the majority answer is right among kept and dropped prompts.
"""

from __future__ import annotations

from collections.abc import Callable

from posttrain.errors import UserError
from posttrain.inference.engine import SamplingParams
from posttrain.rewards import gsm8k, math

INSTRUCTIONS = {
    "gsm8k": "\n\nSolve the problem step by step. Write the final answer on the last line as '#### <number>'.",
    "math": "\n\nSolve the problem step by step. Put the final answer in \\boxed{}.",
}
EXTRACTORS: dict[str, Callable[[str], str | None]] = {"gsm8k": gsm8k.extract, "math": math.extract}


def _same(verifier: str) -> Callable[[str, str], bool]:
    if verifier == "gsm8k":
        return gsm8k.equivalent

    def same(a: str, b: str) -> bool:
        try:
            return math.equivalent(a, b)
        except Exception:  # math-verify raises on inputs it cannot handle
            return a.strip() == b.strip()
    return same


def check_verifier(verifier: str | None, where: str) -> str:
    if verifier not in EXTRACTORS:
        raise UserError(f"{where}: verifier {verifier!r} has no answer extractor; use one of {', '.join(EXTRACTORS)}")
    return verifier


def solve(engine, prompts: list[dict], samples: int = 4, temperature: float = 0.7, max_new_tokens: int = 512,
          seed: int = 0, instruct: bool = True) -> list[dict]:
    """Each prompt record with ``solutions``: ``[{"text", "answer"}]``, ``samples`` of them."""
    for i, p in enumerate(prompts):
        check_verifier(p.get("verifier"), f"prompt {i}")
    asks = [p["messages"][:-1] + [{"role": "user", "content": p["messages"][-1]["content"]
                                   + (INSTRUCTIONS[p["verifier"]] if instruct else "")}] for p in prompts]
    outs = engine.generate(asks, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=samples,
                                                seed=seed))
    solved = [{**p, "solutions": []} for p in prompts]
    for o in outs:
        rec = solved[o.prompt_index]
        rec["solutions"].append({"text": o.text, "answer": EXTRACTORS[rec["verifier"]](o.text),
                                 "finish_reason": o.finish_reason})
    return solved


def majority(answers: list[str | None], same: Callable[[str, str], bool]) -> tuple[str | None, list[int]]:
    """The majority answer and the indices of the solutions that gave it (see the module docstring)."""
    classes: list[tuple[str, list[int]]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for rep, members in classes:
            if same(a, rep):
                members.append(i)
                break
        else:
            classes.append((a, [i]))
    if not classes:
        return None, []
    return max(classes, key=lambda c: len(c[1]))  # max keeps the first of equal sizes


def vote(records: list[dict], min_agreement: float = 0.5) -> tuple[list[dict], list[dict], dict]:
    """(SFT records of kept solutions, verifiable records of kept prompts, report)."""
    if not 0 < min_agreement <= 1:
        raise UserError(f"--min-agreement must be in (0, 1], got {min_agreement}")
    sft, rlvr = [], []
    stats = {"prompts": len(records), "kept_prompts": 0, "solutions": 0, "kept_solutions": 0,
             "with_ground_truth": 0, "majority_correct_kept": 0, "majority_correct_dropped": 0, "dropped_with_truth": 0}
    for k, rec in enumerate(records):
        verifier = check_verifier(rec.get("verifier"), f"record {k}")
        sols = rec.get("solutions")
        if not isinstance(sols, list) or not sols:
            raise UserError(f"record {k}: field 'solutions' must be a non-empty list (the output of `posttrain data solve`)")
        same = _same(verifier)
        answer, members = majority([s.get("answer") for s in sols], same)
        share = len(members) / len(sols)
        kept = answer is not None and share >= min_agreement
        stats["solutions"] += len(sols)
        truth = rec.get("ground_truth")
        if truth is not None:
            stats["with_ground_truth"] += 1
            right = answer is not None and same(answer, str(truth))
            stats["majority_correct_kept" if kept else "majority_correct_dropped"] += int(right)
            stats["dropped_with_truth"] += int(not kept)
        if not kept:
            continue
        stats["kept_prompts"] += 1
        stats["kept_solutions"] += len(members)
        extras = {key: rec[key] for key in ("id", "source", "license", "persona") if key in rec}
        for i in members:
            sft.append({"messages": rec["messages"] + [{"role": "assistant", "content": sols[i]["text"]}],
                        "majority_answer": answer, "agreement": round(share, 4), **extras})
        rlvr.append({"messages": rec["messages"], "ground_truth": truth if truth is not None else answer,
                     "verifier": verifier, "agreement": round(share, 4), **extras})
    stats["kept_prompt_fraction"] = round(stats["kept_prompts"] / max(stats["prompts"], 1), 4)
    stats["kept_solution_fraction"] = round(stats["kept_solutions"] / max(stats["solutions"], 1), 4)
    return sft, rlvr, stats
