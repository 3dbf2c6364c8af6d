"""HumanEval-style code correctness, executed only in the sandbox (``posttrain.rewards.sandbox``).

``ground_truth`` is ``{"test": str, "entry_point": str}`` as in HumanEval, optionally with the
task's ``"prompt"`` (its signature and docstring). The candidate program is the response alone when
it defines ``def <entry_point>(`` (with the prompt's import lines put first), otherwise the prompt
followed by the response (a completion of the prompt's function body). A fenced ```python block in
the response is taken out of its fence.

The verdict comes from outside the candidate's reach: the candidate program runs in one sandbox and
never sees the tests; the prompt (for its helper functions) and the test code run in a second sandbox,
as ``check(candidate)``, where ``candidate`` (and the entry point's name) forwards each call's arguments through this process to the
entry point in the first sandbox and returns the value it sent back, decoded as plain data (numbers,
strings, bytes, lists, tuples, dicts, sets: no object of the candidate's, so no ``__eq__`` of its own).
Score: 1.0 when the checker's ``check`` ran to its end, else 0.0. Whatever the candidate does (print a
marker, exit 0, patch builtins, kill itself, write on the control pipe, flood the output) it can only
make its own calls fail. A failure of any kind scores 0 and is logged; ``SandboxUnavailable`` (the
machine cannot isolate, found before any candidate code runs) is raised.
"""

from __future__ import annotations

import json
import re
import time

from posttrain.rewards import sandbox
from posttrain.util import log

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)
TIMEOUT_SECONDS = 10.0


def program(response: str, ground_truth: dict) -> str:
    """The candidate program (the tests are not part of it)."""
    fenced = _FENCE.findall(response)
    code = fenced[-1] if fenced else response
    prompt = ground_truth.get("prompt", "")
    entry = ground_truth["entry_point"]
    if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        imports = "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))
        return f"{imports}\n\n{code}\n"
    return prompt + code + "\n"


def checker(ground_truth: dict) -> str:
    """The checker program: the prompt's definitions (helpers such as HumanEval/38's ``encode_cyclic``),
    the entry point's name bound to the remote candidate (HumanEval/33's tests call it by name), the
    tests, and ``check`` called on it."""
    prompt = ground_truth.get("prompt", "")
    try:
        compile(prompt, "prompt", "exec")
    except SyntaxError:
        prompt += "    pass\n"  # a signature whose body the response was to write
    entry = ground_truth["entry_point"]
    return f"{prompt}\n\n{entry} = __posttrain_remote__\n\n{ground_truth['test']}\n\ncheck({entry})\n"


def verdict(response: str, ground_truth: dict, timeout: float | None = None) -> tuple[bool, str]:
    """``(passed, why)``: the candidate in one sandbox, the tests in another (see the module docstring),
    both within one wall-clock ``timeout`` (default ``TIMEOUT_SECONDS``)."""
    timeout = TIMEOUT_SECONDS if timeout is None else timeout
    deadline = time.monotonic() + timeout
    entry = ground_truth["entry_point"]
    with sandbox.Sandbox() as candidate:
        loaded = candidate.exec(program(response, ground_truth), timeout=timeout)
        if not loaded.ok:
            return False, f"candidate: {loaded.error['type']}: {loaded.error['message']}"

        broken: list[dict] = []  # the candidate died, hung, flooded or broke the protocol

        def call(args: list) -> sandbox.Reply:
            reply = candidate.call(entry, args, timeout=max(0.0, deadline - time.monotonic()))
            if not candidate.alive:
                broken.append(reply.error)
            return reply

        with sandbox.Sandbox() as tests:
            checked = tests.exec(checker(ground_truth), timeout=max(0.0, deadline - time.monotonic()), remote=call)
    if broken:  # even if the tests caught the exceptions its calls raised
        return False, f"candidate: {broken[0]['type']}: {broken[0]['message']}"
    if checked.ok:
        return True, "passed"
    return False, f"tests: {checked.error['type']}: {checked.error['message']}"


def score(response: str, ground_truth) -> float:
    try:
        if isinstance(ground_truth, str):
            ground_truth = json.loads(ground_truth)
        passed, why = verdict(response, ground_truth)
    except sandbox.SandboxUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - a hostile response scores 0, it never stops a run
        passed, why = False, f"{type(e).__name__}: {e}"
        log(f"code verifier: scored 0 after an error ({why[:300]})")
    return 1.0 if passed else 0.0
