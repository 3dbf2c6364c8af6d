"""HumanEval-style code correctness, executed only in the sandbox (``posttrain.rewards.sandbox``).

``ground_truth`` is ``{"test": str, "entry_point": str}`` as in HumanEval, optionally with the
task's ``"prompt"`` (its signature and docstring). The program is: the response alone when it
defines ``def <entry_point>(`` (with the prompt's import lines put first), otherwise the prompt
followed by the response (a completion of the prompt's function body); then the test code and
``check(<entry_point>)``. A fenced ```python block in the response is taken out of its fence.
Score: 1.0 when the program passes in the sandbox (all asserts of ``check``), else 0.0.
"""

from __future__ import annotations

import json
import re

from posttrain.rewards import sandbox

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)
TIMEOUT_SECONDS = 10.0


def program(response: str, ground_truth: dict) -> str:
    fenced = _FENCE.findall(response)
    code = fenced[-1] if fenced else response
    prompt = ground_truth.get("prompt", "")
    entry = ground_truth["entry_point"]
    if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        imports = "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))
        body = f"{imports}\n\n{code}"
    else:
        body = prompt + code
    return f"{body}\n\n{ground_truth['test']}\n\ncheck({entry})\n"


def score(response: str, ground_truth) -> float:
    if isinstance(ground_truth, str):
        ground_truth = json.loads(ground_truth)
    return 1.0 if sandbox.run(program(response, ground_truth), timeout=TIMEOUT_SECONDS).passed else 0.0
