"""Verifiers: hand-written positive and negative cases, and agreement on real data files."""

import json
import threading

import pytest
from conftest import DATA

from posttrain.errors import UserError
from posttrain.rewards import get_verifier
from posttrain.rewards.extract import final_answer_line, last_boxed

GSM8K_CASES = [
    ("She sold 48 + 24 = 72 clips.\n#### 72", "72", 1.0),
    ("#### 1,234", "1234", 1.0),
    ("The answer is $1,234.", "1234", 1.0),
    ("So the total is \\boxed{18}.", "18", 1.0),
    ("It costs $18.00 dollars.", "18", 1.0),
    ("He ends with -3 apples", "-3", 1.0),
    ("That is 50% of it: 50", "50", 1.0),
    ("0.5 of the cake", ".5", 1.0),
    ("#### 72\nWait, maybe 73", "72", 1.0),  # after #### wins over later numbers elsewhere
    ("The answer is 71.", "72", 0.0),
    ("I don't know.", "72", 0.0),
    ("\\boxed{7} but then 72", "72", 0.0),  # the boxed answer is the answer
    ("12 then 72 then 27", "72", 0.0),  # the last number counts
    ("#### 7.2", "72", 0.0),
]


@pytest.mark.parametrize("response, gold, want", GSM8K_CASES)
def test_gsm8k(response, gold, want):
    assert get_verifier("gsm8k")(response, gold) == want


def test_gsm8k_reference_solutions_score_one():
    with open(DATA / "gsm8k/train.jsonl") as f:
        rows = [json.loads(line) for _, line in zip(range(500), f)]
    from posttrain.data.adapters import gsm8k_final_answer

    verify = get_verifier("gsm8k")
    assert all(verify(r["answer"], gsm8k_final_answer(r["answer"])) == 1.0 for r in rows)
    # and the answer of the next problem is (almost always) wrong for this one
    wrong = sum(verify(a["answer"], gsm8k_final_answer(b["answer"])) for a, b in zip(rows, rows[1:]))
    assert wrong <= 10


MATH_CASES = [
    ("so the answer is $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.5}", "\\frac12", 1.0),
    ("\\boxed{1/2}", "\\dfrac{1}{2}", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("Final Answer: 6", "6", 1.0),
    ("The final answer is $x^2+2x+1$.", "(x+1)^2", 1.0),
    ("\\boxed{\\{1, 2\\}}", "\\{2, 1\\}", 1.0),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    ("\\boxed{7}", "6", 0.0),
    ("I think it is 6 but I am not sure", "6", 0.0),  # no boxed or final answer: nothing extracted
    ("\\boxed{x+1}", "x-1", 0.0),
]


@pytest.mark.parametrize("response, gold, want", MATH_CASES)
def test_math(response, gold, want):
    assert get_verifier("math")(response, gold) == want


def test_math_reference_solutions_and_worker_threads():
    rows = [json.loads(x) for x in open(DATA / "math/math500_dev.jsonl")]
    verify = get_verifier("math")
    scores = [verify(r["solution"], r["answer"]) for r in rows]
    assert [r["answer"] for r, s in zip(rows, scores) if s != 1.0] == []  # every reference solution: 250 of 250
    out = []
    t = threading.Thread(target=lambda: out.extend(verify(r["solution"], r["answer"]) for r in rows[:20]))
    t.start()
    t.join()
    assert out == scores[:20]


@pytest.mark.parametrize("response, want", [
    ("<think>add them</think> 7", 1.0),
    ("  <think>\nstep 1\nstep 2\n</think>\nThe answer is 7.", 1.0),
    ("7", 0.0),
    ("<think></think> 7", 0.0),
    ("<think>add</think>", 0.0),
    ("<think>a</think> 7 <think>b</think> 8", 0.0),
    ("<think>a <think> b</think> 7", 0.0),
])
def test_think_format(response, want):
    assert get_verifier("think_format")(response, None) == want


def test_extraction_helpers_and_registry():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("none") is None
    assert final_answer_line("work\nFinal Answer: 42.\n") == "42"
    with pytest.raises(UserError, match="unknown verifier 'gsm9k'; known: code, gsm8k, ifeval, ifeval_loose, math, think_format"):
        get_verifier("gsm9k")


def test_ifeval_checks_from_many_threads_in_a_fresh_interpreter():
    """The first imports of nltk and langdetect happen inside scorer threads (evaluation scores in a
    thread pool); they used to race ("partially initialized module 'nltk'")."""
    import subprocess
    import sys

    program = """
from concurrent.futures import ThreadPoolExecutor
from posttrain.rewards.ifeval import score
gts = [{"instruction_id_list": ["length_constraints:number_sentences"], "kwargs": [{"num_sentences": 2, "relation": "at least"}]},
       {"instruction_id_list": ["language:response_language"], "kwargs": [{"language": "en"}]},
       {"instruction_id_list": ["change_case:capital_word_frequency"],
        "kwargs": [{"capital_frequency": 1, "capital_relation": "at least"}]}]
with ThreadPoolExecutor(8) as pool:
    got = list(pool.map(lambda i: score("This is ONE sentence written in English. Here is another one.", gts[i % 3]), range(24)))
assert got == [1.0] * 24, got
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
