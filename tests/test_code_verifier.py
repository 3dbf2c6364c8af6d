"""The code verifier: HumanEval canonical solutions pass, mutated ones fail, and hostile programs
are contained in the sandbox, scored 0, and leave this test process running."""

import gzip
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
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


ADD = {"test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
       "entry_point": "add"}

HOSTILE = {
    "infinite_loop": "def add(a, b):\n    while True:\n        pass\n",
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "memory_bomb": "x = []\nwhile True:\n    x.append(bytearray(1 << 26))\n",
    "socket_connect": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)\n"
                      "def add(a, b):\n    return a + b\n",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(0, signal.SIGKILL)\n",
    "exit_before_asserts": "import os\ndef add(a, b):\n    return 0\nos._exit(0)\n",
    "sys_exit_zero": "import sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n",
    "monkeypatch_assert": "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n"
                          "def check(candidate):\n    pass\nimport sys\nsys.excepthook = lambda *a: None\n"
                          "def add(a, b):\n    return 0\n",
    "thread_escape": "import threading\nthreading.Thread(target=lambda: None).start()\n"
                     "def add(a, b):\n    return a + b\n",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_programs_are_contained_and_score_zero(case, monkeypatch):
    monkeypatch.setattr(code, "TIMEOUT_SECONDS", 5.0)
    assert code.score(HOSTILE[case], ADD) == 0.0
    assert code.score("def add(a, b):\n    return a + b\n", ADD) == 1.0  # and the sandbox still works after


def test_no_writes_outside_and_no_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", "hunter2-do-not-leak")
    target = tmp_path / "outside.txt"
    for where in (target, "/etc/posttrain-evil", os.path.expanduser("~/posttrain-evil")):
        program = (f"import os\ntry:\n    open({str(where)!r}, 'w').write('x')\n    print('wrote')\n"
                   f"except OSError as e:\n    print('refused', e.errno)\n"
                   "print(dict(os.environ))\n"
                   "for pid in os.listdir('/proc'):\n"
                   "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
                   "    except OSError:\n        pass\n")
        result = sandbox.run(program, timeout=10)
        assert result.passed
        assert "hunter2" not in result.stdout + result.stderr
    assert not target.exists() and not os.path.exists("/etc/posttrain-evil")
    assert not os.path.exists(os.path.expanduser("~/posttrain-evil"))


def test_limits_are_reported():
    r = sandbox.run("while True:\n    pass\n", timeout=2, cpu_seconds=30)
    assert r.timed_out and not r.passed
    r = sandbox.run("x = bytearray(4 << 30)\n", memory_mb=512)
    assert not r.passed and "MemoryError" in r.stderr
    r = sandbox.run("print('out')\n")
    assert r.passed and r.stdout == "out" and r.returncode == 0
