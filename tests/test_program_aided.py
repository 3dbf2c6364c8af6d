"""posttrain data program-aided: GSM8K calculator steps as one checked program, trajectories the python
environment would play, the committed files rebuilt byte for byte."""

from __future__ import annotations

import json

import pytest
from conftest import DATA, write_jsonl

from posttrain.cli import main
from posttrain.data.adapters import GSM8K_INSTRUCTION, gsm8k_final_answer
from posttrain.data.synth import program_aided as PA
from posttrain.envs.python import PythonEnv
from posttrain.eval.tasks import gsm8k

NATALIA = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?")
NATALIA_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def test_steps_become_a_chained_program():
    assert PA.steps(NATALIA_ANSWER) == [("48/2", "24"), ("48+24", "72")]
    # 24 is not a number of the question: it is step 1's result, so step 2 names it; 48 stays a literal
    assert PA.program(NATALIA, NATALIA_ANSWER) == ("x1 = 48 / 2\nx2 = 48 + x1\nprint(x2)", "72.0")
    code, printed = PA.program("Tom has 3 bags of 4 apples and eats 4. How many are left?",
                               "3*4=<<3*4=12>>12\n12-4=<<12-4=8>>8\n#### 8")
    assert code == "x1 = 3 * 4\nx2 = x1 - 4\nprint(x2)" and printed == "8"


@pytest.mark.parametrize("answer, why", [
    ("48/2 = <<48/2=25>>25\n#### 25", "step 1 '48/2' is 24.0, not 25"),          # a wrong annotation
    ("<<48/2=24>>24 then <<24+1=25>>25\n#### 26", "the last step is 25.0, the answer 26.0"),
    ("no steps here\n#### 3", "no calculator steps"),
    ("<<__import__('os').getpid()=1>>\n#### 1", "Call is not arithmetic"),   # parses, but is not arithmetic
    ("<<(3).real=3>>\n#### 3", "Attribute is not arithmetic"),
    ("<<3+=3>>\n#### 3", "step 1 '3+' does not parse"),
    ("<<9**99=1>>\n#### 1", "an exponent above 16"),
    ("<<1/0=1>>\n#### 1", "division by zero"),
])
def test_unchecked_solutions_are_refused(answer, why):
    with pytest.raises(PA.Unchecked) as e:
        PA.program("How many?", answer)
    assert str(e.value) == why


def test_the_committed_trajectories_are_what_the_interpreter_prints_and_the_eval_asks():
    records = [json.loads(line) for line in (DATA / "gsm8k_python" / "sft.jsonl").read_text().splitlines()]
    env = PythonEnv()
    assert len(records) == 400 and all(r["tools"] == env.tools for r in records)
    for r in records[:12]:
        system, user, call, tool, final = r["messages"]
        assert system == {"role": "system", "content": env.system_prompt}
        question = user["content"].removesuffix(GSM8K_INSTRUCTION)
        assert gsm8k.ZERO_SHOT.instance({"question": question, "answer": "#### 0"}, "x")["prompt"] == [user]
        state = env.reset({"messages": [user], "ground_truth": "0", "verifier": "gsm8k"}).state
        try:
            printed = env.call(state, "python", call["tool_calls"][0]["function"]["arguments"])
        finally:
            env.close(state)
        assert printed == tool["content"]
        path, line = r["source"].rsplit(":", 1)
        raw = json.loads((DATA.parent / path).read_text().splitlines()[int(line) - 1])
        assert raw["question"] == question and final == {"role": "assistant", "content": "#### " + gsm8k_final_answer(raw["answer"])}


def test_the_committed_files_are_rebuilt_byte_for_byte(tmp_path, monkeypatch):
    args = json.loads((DATA / "gsm8k_python" / "report.json").read_text())["arguments"]
    out = tmp_path / "o"
    monkeypatch.chdir(DATA.parent)  # records name their source as the report's relative path
    assert main(["data", "program-aided", "--input", args["input"], "--limit", str(args["limit"]),
                 "--sft", str(args["sft"]), "--rlvr", str(args["rlvr"]), "--rlvr-max-steps", str(args["rlvr_max_steps"]),
                 "--seed", str(args["seed"]), "--output", str(out)]) == 0
    for name in ("sft.jsonl", "rlvr.jsonl"):
        assert (out / name).read_bytes() == (DATA / "gsm8k_python" / name).read_bytes(), name
    heldout = {json.loads(line)["question"] for line in (DATA / "gsm8k" / "heldout.jsonl").read_text().splitlines()}
    for name in ("sft.jsonl", "rlvr.jsonl"):
        for line in (out / name).read_text().splitlines():
            r = json.loads(line)
            assert int(r["source"].rsplit(":", 1)[1]) <= 7000
            assert r["messages"][-1 if name == "rlvr.jsonl" else 1]["content"].removesuffix(GSM8K_INSTRUCTION) not in heldout
    assert all(json.loads(line)["steps"] <= 3 for line in (out / "rlvr.jsonl").read_text().splitlines())


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": NATALIA_ANSWER}, {"question": "q"}])
    assert main(["data", "program-aided", "--input", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("bad.jsonl:2: field 'answer' must be a non-empty string (GSM8K's format)") and "\n" not in err
    assert not (tmp_path / "o").exists()
    good = write_jsonl(tmp_path / "good.jsonl", [{"question": NATALIA, "answer": NATALIA_ANSWER}])
    assert main(["data", "program-aided", "--input", str(good), "--sft", "1", "--rlvr", "1", "--output", str(tmp_path / "o")]) == 2
    assert "1 solutions check, asked for --sft 1 + --rlvr 1" in capsys.readouterr().err
