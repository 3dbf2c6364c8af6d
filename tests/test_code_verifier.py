"""The code verifier: HumanEval canonical solutions pass, mutated ones fail (hostile programs:
tests/test_sandbox_hostile.py)."""

import gzip
import json
from concurrent.futures import ThreadPoolExecutor

from conftest import DATA

from posttrain.rewards import code, get_verifier, sandbox

HUMANEVAL = [json.loads(x) for x in gzip.open(DATA / "humaneval/HumanEval.jsonl.gz", "rt")]


def truth(task: dict) -> dict:
    return {"test": task["test"], "entry_point": task["entry_point"], "prompt": task["prompt"]}


def test_all_canonical_solutions_pass_and_mutations_fail():
    verify = get_verifier("code")
    with ThreadPoolExecutor(4) as pool:
        good = list(pool.map(lambda t: verify(t["canonical_solution"], truth(t)), HUMANEVAL))
        # the mutation: the function body returns None before doing anything
        bad = list(pool.map(lambda t: verify("    return None\n" + t["canonical_solution"], truth(t)), HUMANEVAL))
    assert len(good) == 164
    assert [t["task_id"] for t, g in zip(HUMANEVAL, good) if g != 1.0] == []
    assert [t["task_id"] for t, b in zip(HUMANEVAL, bad) if b != 0.0] == []


def test_full_function_and_fenced_responses():
    task = HUMANEVAL[0]
    full = task["prompt"] + task["canonical_solution"]
    assert code.score(full, truth(task)) == 1.0
    assert code.score(f"Here you go:\n```python\n{full}```\nDone.", truth(task)) == 1.0
    assert code.score(json.dumps(truth(task)) and full, json.dumps(truth(task))) == 1.0  # ground truth as JSON


def test_limits_are_reported():
    r = sandbox.run("while True:\n    pass\n", timeout=2, cpu_seconds=30)
    assert r.timed_out and not r.passed
    r = sandbox.run("x = bytearray(4 << 30)\n", memory_mb=512)
    assert not r.passed and "MemoryError" in r.stderr
    r = sandbox.run("print('out')\n")
    assert r.passed and r.stdout == "out" and r.error is None
    r = sandbox.run("print('out')\nraise KeyError('k')\n")
    assert not r.passed and r.stdout == "out" and r.error["type"] == "KeyError" and "KeyError: 'k'" in r.stderr
