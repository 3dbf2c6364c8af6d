"""Turn raw records of well-known formats into the record kinds of ``posttrain.data.records``.

Formats (``format:`` of a data source; ``auto`` detects them from the keys):

- ``messages``: already ``{"messages": [...]}`` (SFT / verifiable) records.
- ``prompt_completion``: ``{"prompt": str, "completion": str}`` (TRL's prompt-completion form).
- ``gsm8k``: ``{"question", "answer"}`` with the final answer on a ``#### N`` line; calculator
  annotations ``<<48/2=24>>`` are removed from the solution text.
- ``hh_rlhf``: ``{"chosen", "rejected"}`` as raw ``\\n\\nHuman: ... \\n\\nAssistant: ...`` text. As SFT
  data, the ``chosen`` conversation up to its last non-empty reply (a few end in an empty one).
- ``preference``: ``{"chosen", "rejected"}`` message lists, or ``{"prompt", "chosen", "rejected"}``.

Verifiable prompts (``kind: verifiable``) also come from: ``gsm8k`` (ground truth = the ``####``
number, verifier ``gsm8k``), ``math`` (MATH / MATH-500: ``{"problem", "answer"}`` or only a
``solution`` whose last ``\\boxed{}`` is the answer; verifier ``math``), ``ifeval`` (IFEval's
``{"prompt", "instruction_id_list", "kwargs"}``; verifier ``ifeval``) and ``humaneval``
(``{"prompt", "test", "entry_point"}``: the user turn asks to complete the function; verifier ``code``).
"""

from __future__ import annotations

import re

from posttrain.data import records
from posttrain.errors import UserError

KINDS = ("sft", "preference", "verifiable")
_CALC = re.compile(r"<<[^<>]*>>")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def detect_format(rec: dict) -> str:
    keys = set(rec)
    if "chosen" in keys and "rejected" in keys:
        return "hh_rlhf" if isinstance(rec["chosen"], str) and "\n\nHuman:" in rec["chosen"] else "preference"
    if "messages" in keys:
        return "messages"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if "problem" in keys and ("answer" in keys or "solution" in keys):
        return "math"
    if "instruction_id_list" in keys:
        return "ifeval"
    if {"test", "entry_point"} <= keys:
        return "humaneval"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "instances"} <= keys:
        return "self_instruct"
    return "messages"  # validation then names the missing field


def self_instruct_task(rec: dict, where: str) -> tuple[str, str]:
    """A self-instruct task's request (the instruction, then the first instance's input) and that
    instance's output ("" when missing)."""
    instances = rec.get("instances")
    first = instances[0] if isinstance(instances, list) and instances and isinstance(instances[0], dict) else {}
    extra = str(first.get("input") or "").strip()
    return _field(rec, "instruction", where).strip() + (f"\n\n{extra}" if extra else ""), str(first.get("output") or "").strip()


GSM8K_INSTRUCTION = "\nSolve the problem step by step. Then write the final answer as a number after '####'."
"""What ``posttrain eval --tasks gsm8k`` appends to a question (and data built to match it)."""


def gsm8k_final_answer(answer: str) -> str:
    """The text after the last ``####``, without thousands separators."""
    return answer.split("####")[-1].strip().replace(",", "")


def gsm8k_solution(answer: str) -> str:
    body, _, final = answer.rpartition("####")
    body = _CALC.sub("", body).strip()
    return f"{body}\n#### {final.strip()}" if body else f"#### {final.strip()}"


def parse_hh_text(text: str, where: str, field: str) -> list[dict]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` -> ``[{"role": "user", ...}, {"role": "assistant", ...}]``."""
    if not isinstance(text, str):
        raise UserError(f"{where}: field '{field}' must be a string in the hh-rlhf format")
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise UserError(f"{where}: field '{field}' does not start with '\\n\\nHuman: ' (hh-rlhf format)")
    turns = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if turns and turns[-1]["role"] == role:  # a speaker tag inside a turn's text: keep it as text
            turns[-1]["content"] += f"\n\n{speaker}: {content}"
        else:
            turns.append({"role": role, "content": content.strip()})
    return turns


def to_kind(rec: dict, kind: str, fmt: str, where: str) -> dict:
    """Convert one raw record of format ``fmt`` (or ``auto``) into a validated record of ``kind``."""
    if fmt == "auto":
        fmt = detect_format(rec)
    if kind == "sft":
        return records.sft_record(_as_sft(rec, fmt, where), where)
    if kind == "preference":
        if fmt == "hh_rlhf":
            rec = {**rec, "chosen": parse_hh_text(rec.get("chosen"), where, "chosen"),
                   "rejected": parse_hh_text(rec.get("rejected"), where, "rejected")}
        elif fmt not in ("preference", "messages"):
            raise UserError(f"{where}: format '{fmt}' has no preference pairs")
        return records.preference_record(rec, where)
    if kind == "verifiable":
        if fmt == "gsm8k":
            rec = {**rec, "messages": [{"role": "user", "content": _field(rec, "question", where)}],
                   "ground_truth": gsm8k_final_answer(_field(rec, "answer", where)),
                   "verifier": rec.get("verifier", "gsm8k")}
        elif fmt == "math":
            rec = {**rec, "messages": [{"role": "user", "content": _field(rec, "problem", where)}],
                   "ground_truth": math_answer(rec, where), "verifier": rec.get("verifier", "math")}
        elif fmt == "ifeval":
            ids, kwargs = rec.get("instruction_id_list"), rec.get("kwargs")
            if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
                raise UserError(f"{where}: fields 'instruction_id_list' and 'kwargs' must be lists of equal length")
            rec = {**rec, "messages": [{"role": "user", "content": _field(rec, "prompt", where)}],
                   "ground_truth": {"instruction_id_list": ids, "kwargs": kwargs}, "verifier": rec.get("verifier", "ifeval")}
        elif fmt == "humaneval":
            code = _field(rec, "prompt", where)
            rec = {**rec, "messages": [{"role": "user", "content": HUMANEVAL_INSTRUCTION + code}],
                   "ground_truth": {"test": _field(rec, "test", where), "entry_point": _field(rec, "entry_point", where),
                                    "prompt": code},
                   "verifier": rec.get("verifier", "code"), "id": rec.get("task_id", rec.get("id"))}
        return records.verifiable_record(rec, where)
    raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")


HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the whole function in a code block.\n\n"


def math_answer(rec: dict, where: str) -> str:
    if isinstance(rec.get("answer"), str) and rec["answer"].strip():
        return rec["answer"]
    from posttrain.rewards.extract import last_boxed

    boxed = last_boxed(_field(rec, "solution", where))
    if boxed is None:
        raise UserError(f"{where}: field 'answer' is missing and field 'solution' has no \\boxed{{}} answer")
    return boxed


def _field(rec: dict, key: str, where: str) -> str:
    if key not in rec:
        raise UserError(f"{where}: field '{key}' is missing")
    if not isinstance(rec[key], str):
        raise UserError(f"{where}: field '{key}' must be a string, got {type(rec[key]).__name__}")
    return rec[key]


def _as_sft(rec: dict, fmt: str, where: str) -> dict:
    if fmt == "messages":
        return rec
    if fmt == "gsm8k":
        messages = [{"role": "user", "content": _field(rec, "question", where)},
                    {"role": "assistant", "content": gsm8k_solution(_field(rec, "answer", where))}]
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _field(rec, "prompt", where)},
                    {"role": "assistant", "content": _field(rec, "completion", where)}]
    elif fmt == "hh_rlhf":
        messages = parse_hh_text(rec.get("chosen"), where, "chosen")
        empty = next((i for i, m in enumerate(messages) if m["role"] == "assistant" and not m["content"]), None)
        if empty is not None and empty > 1:  # a few chosen conversations end in an empty reply: cut there
            messages = messages[:empty - 1]
    elif fmt == "self_instruct":
        request, output = self_instruct_task(rec, where)
        if not output:
            raise UserError(f"{where}: field 'instances' needs a first instance with a non-empty 'output'")
        messages = [{"role": "user", "content": request}, {"role": "assistant", "content": output}]
    elif fmt == "preference":
        pair = records.preference_record(rec, where)
        messages = pair["prompt"] + pair["chosen"]
    else:
        raise UserError(f"{where}: unknown format '{fmt}'")
    return {**{k: v for k, v in rec.items() if k in records.PASSTHROUGH}, "messages": messages}
