"""`posttrain data constraints`: verifiable-instruction prompts over local requests. Draws are
compatible and described in the prompt, the ground truth is what the ifeval verifier reads, kinds are
balanced, requests that overlap the evaluation prompts are dropped, and the committed training file is
exactly what the command writes."""

import json
import random

import pytest
from conftest import DATA, write_jsonl

from posttrain.cli import main
from posttrain.data.io import read_records
from posttrain.data.synth import constraints as C
from posttrain.rewards import get_verifier, ifeval

REQUEST = "Explain how lighthouse keepers maintained their lamps during winter storms"


@pytest.mark.parametrize("seed", range(400))
def test_draws_are_compatible_described_and_checkable(seed):
    rng = random.Random(seed)
    k = rng.randint(1, 3)
    picked = C.draw(rng, k, REQUEST, "self_instruct")
    assert len(picked) == k
    groups = [c.group for c, _ in picked]
    assert len(set(groups)) == k and ("solo" not in groups or k == 1)
    assert not any(frozenset((a, b)) in C.CLASHES for a in groups for b in groups)
    prompt, truth = C.constrain(REQUEST, picked)
    assert prompt.startswith(REQUEST)
    for c, kw in picked:
        assert c.describe(kw if c.id != "combination:repeat_prompt" else {}) in prompt
    assert sorted(truth["instruction_id_list"]) == sorted(c.id for c, _ in picked)
    for iid, kw in zip(truth["instruction_id_list"], truth["kwargs"]):
        if iid == "combination:repeat_prompt":  # the prompt minus its own sentence, as in IFEval
            assert prompt == f"{kw['prompt_to_repeat']} {C.BY_ID[iid].describe({})}"
        if iid.startswith("keywords:") and iid != "keywords:forbidden_words" and iid != "keywords:letter_frequency":
            words = kw.get("keywords") or [kw["keyword"]]
            assert all(w in REQUEST.lower() for w in words)  # keyword constraints use the request's words
    assert 0.0 <= ifeval.score("Some reply.", truth) <= 1.0


def test_no_request_no_request_constraints_and_kind_exclusions():
    for seed in range(200):
        ids = {c.id for c, _ in C.draw(random.Random(seed), 1, None)} | \
              {c.id for c, _ in C.draw(random.Random(seed), 1, "What is 3 + 4 times 2 apples", "gsm8k")}
        assert "combination:repeat_prompt" not in {c.id for c, _ in C.draw(random.Random(seed), 3, None)}
        assert "detectable_format:constrained_response" not in \
            {c.id for c, _ in C.draw(random.Random(seed), 1, "Tom has three apples and buys more", "gsm8k")}
        assert ids
    assert C.content_words("The Lighthouse keepers, and their LAMPS!") == ["lighthouse", "keepers", "lamps"]


def test_a_satisfying_reply_scores_one_per_format():
    truth = {"instruction_id_list": ["punctuation:no_comma", "detectable_content:postscript", "detectable_format:title"],
             "kwargs": [{}, {"postscript_marker": "P.S."}, {}]}
    assert get_verifier("ifeval")("<<Lamps>>\nKeepers trimmed wicks daily.\nP.S. Stay warm.", truth) == 1.0
    assert get_verifier("ifeval")("Keepers, in winter, trimmed wicks.", truth) == 0.0


def test_request_kinds_and_bad_records(tmp_path):
    seeds = [json.loads(x) for x in (DATA / "self_instruct" / "seed_tasks.jsonl").read_text().splitlines()[:3]]
    rows = [seeds[0], {"chosen": "\n\nHuman: How do I bake rye bread at home?\n\nAssistant: Like so.", "rejected": "x"},
            {"question": "Tom has 3 apples and buys 4 more. How many now?", "answer": "3+4=7\n#### 7"},
            {"persona": "A nurse on night shifts"}, {"prompt": "Summarise the history of tea in China."},
            {"prompt": "Too short"}, {"prompt": "Summarise the history of tea in China."}]
    requests, dropped = C.read_requests([str(write_jsonl(tmp_path / "r.jsonl", rows))])
    kinds = [r["kind"] for r in requests]
    assert kinds == ["self_instruct", "hh_rlhf", "gsm8k"] + ["persona"] * len(C.PERSONA_TEMPLATES) + ["prompt"]
    assert "a nurse on night shifts" in requests[3]["text"]
    assert dropped == {"prompt: length": 1, "prompt: duplicate": 1}
    records = C.build(requests, 30, seed=1)
    assert [r["source"] for r in records[:5]] == ["constraints/gsm8k", "constraints/hh_rlhf", "constraints/persona",
                                                  "constraints/prompt", "constraints/self_instruct"]  # kinds in turn
    assert C.build(requests, 30, seed=1) == records and C.build(requests, 30, seed=2) != records
    with pytest.raises(Exception, match="no usable requests"):
        C.read_requests([str(write_jsonl(tmp_path / "short.jsonl", [{"prompt": "hi"}]))])


def test_command_drops_requests_overlapping_the_evaluation_prompts(tmp_path, capsys):
    ifeval_rows = [raw for raw, _ in read_records(str(DATA / "ifeval" / "ifeval_dev.jsonl"))][:2]
    leaked = {"prompt": ifeval_rows[0]["prompt"]}
    clean = [{"prompt": f"Describe the daily routine of a {job} in a small coastal town."}
             for job in ("baker", "fisher", "teacher", "doctor")]
    src = write_jsonl(tmp_path / "req.jsonl", [leaked] + clean)
    evalf = write_jsonl(tmp_path / "ifeval.jsonl", ifeval_rows)
    assert main(["data", "constraints", "--requests", str(src), "--against", f"ifeval={evalf}", "--n", "8",
                 "--output", str(tmp_path / "out")]) in (0, None)
    report = json.loads((tmp_path / "out" / "report.json").read_text())["stats"]
    assert report["decontamination"]["flagged"] == 1 and report["decontamination"]["checked"] == 5
    records = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert len(records) == 8 and not any(ifeval_rows[0]["prompt"][:40] in r["messages"][0]["content"] for r in records)
    assert all(r["verifier"] == "ifeval" for r in records)


def test_committed_training_prompts_are_what_the_command_writes(tmp_path):
    """data/constraints/ is rebuilt from its report's arguments and compared byte for byte."""
    args = json.loads((DATA / "constraints" / "report.json").read_text())["arguments"]
    root = DATA.parent
    cmd = ["data", "constraints", "--requests", *[str(root / p) for p in args["requests"]], "--n", str(args["n"]),
           "--seed", str(args["seed"]), "--output", str(tmp_path / "out")]
    for a in args["against"]:
        name, path = a.split("=", 1)
        cmd += ["--against", f"{name}={root / path}"]
    main(cmd)
    rows = lambda p: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
    rebuilt, committed = rows(tmp_path / "out" / "records.jsonl"), rows(DATA / "constraints" / "records.jsonl")
    for a, b in zip(rebuilt, committed):  # request_source names the file by the path it was given
        a.pop("request_source"), b.pop("request_source")
    assert rebuilt == committed
