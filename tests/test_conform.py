"""posttrain data conform: reference replies edited to follow IFEval constraints, verified, kept."""

from __future__ import annotations

import json
import random

import pytest
from conftest import DATA, write_jsonl

from posttrain.cli import main
from posttrain.data.synth import conform as CF
from posttrain.rewards import ifeval

REPLY = ("Kickball is played on a field with four bases, much like baseball. The pitcher rolls a big rubber ball to the kicker. "
         "The kicker kicks it and runs to first base. A runner is out when a fielder tags them with the ball. "
         "Each team gets three outs per inning. The team with the most runs after the last inning wins.")
REQUEST = "Can you explain how kickball is played?"


def truth(*pairs):
    return {"instruction_id_list": [i for i, _ in pairs], "kwargs": [kw for _, kw in pairs]}


def test_hand_checked_edits():
    t = truth(("change_case:english_lowercase", {}), ("startend:end_checker", {"end_phrase": "Any other questions?"}))
    assert CF.conform("Kickball is FUN. Try it.", REQUEST, t, random.Random(0)) == \
        "kickball is fun. try it.\n\nany other questions?"
    t = truth(("length_constraints:number_paragraphs", {"num_paragraphs": 3}),
              ("detectable_format:number_highlighted_sections", {"num_highlights": 1}))
    assert CF.conform("One apple. Two bears. Three cats. Four dogs.", REQUEST, t, random.Random(0)) == \
        "*One apple.* Two bears.\n\n***\n\nThree cats.\n\n***\n\nFour dogs."
    t = truth(("length_constraints:nth_paragraph_first_word",
               {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"}),
              ("detectable_format:number_bullet_lists", {"num_bullets": 2}))
    assert CF.conform("One apple. Two bears. Three cats. Four dogs.", REQUEST, t, random.Random(0)) == \
        "One apple.\n\nHowever two bears.\n* Three cats.\n* Four dogs."
    t = truth(("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}), ("punctuation:no_comma", {}))
    assert CF.conform("Hi, you.", "Say hi.", t, random.Random(0)) == "Say hi.\n\nHi you."
    t = truth(("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}),
              ("detectable_content:postscript", {"postscript_marker": "P.S."}))
    assert CF.conform("One apple. Two bears. Three cats.", REQUEST, t, random.Random(0)).startswith("One apple.\n\nP.S. ")


EDITED = [
    ("punctuation:no_comma", {}), ("change_case:english_lowercase", {}), ("change_case:english_capital", {}),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"}),
    ("detectable_format:title", {}), ("detectable_content:postscript", {"postscript_marker": "P.P.S"}),
    ("startend:end_checker", {"end_phrase": "Let me know if you have additional questions."}),
    ("startend:quotation", {}), ("length_constraints:number_words", {"num_words": 50, "relation": "less than"}),
    ("length_constraints:number_sentences", {"num_sentences": 4, "relation": "less than"}),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 4}),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 3, "nth_paragraph": 3, "first_word": "finally"}),
    ("detectable_format:number_bullet_lists", {"num_bullets": 5}),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 3}),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 3}),
    ("detectable_content:number_placeholders", {"num_placeholders": 3}),
    ("keywords:forbidden_words", {"forbidden_words": ["big", "ball"]}),
    ("combination:two_responses", {}), ("combination:repeat_prompt", {"prompt_to_repeat": REQUEST + " Be brief."}),
    ("detectable_format:json_format", {}),
]


@pytest.mark.parametrize("instruction", EDITED, ids=[i for i, _ in EDITED])
def test_every_edit_makes_the_reply_follow_its_constraint(instruction):
    t = truth(instruction)
    assert not all(ifeval.followed(REPLY, t))  # the reference alone does not follow it
    out = CF.conform(REPLY, REQUEST, t, random.Random(0))
    assert all(ifeval.followed(out, t)), out


def test_unfixable_constraints_are_dropped_never_mislabelled(tmp_path, monkeypatch):
    """A constraint with no edit (an at-least length the reply misses) or a shape the reply is too short
    for costs the record; every kept record passes the verifier."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "seeds.jsonl", [{"instruction": REQUEST, "instances": [{"input": "", "output": REPLY}]},
                                          {"instruction": "Name a color.", "instances": [{"input": "", "output": "Red."}]}])
    prompts = [
        {"messages": [{"role": "user", "content": "a"}], "verifier": "ifeval", "request_source": "seeds.jsonl:1",
         "ground_truth": truth(("length_constraints:number_words", {"num_words": 300, "relation": "at least"}))},
        {"messages": [{"role": "user", "content": "b"}], "verifier": "ifeval", "request_source": "seeds.jsonl:2",
         "ground_truth": truth(("length_constraints:number_paragraphs", {"num_paragraphs": 3}))},
        {"messages": [{"role": "user", "content": "c"}], "verifier": "ifeval", "request_source": "seeds.jsonl:1",
         "ground_truth": truth(("startend:quotation", {}), ("keywords:existence", {"keywords": ["inning"]}))},
        {"messages": [{"role": "user", "content": "d"}], "verifier": "ifeval", "request_source": "personas.jsonl:1",
         "ground_truth": truth(("startend:quotation", {}))},
    ]
    records, report = CF.build(prompts, CF.read_references(prompts[:3]))
    assert [r["messages"][0]["content"] for r in records] == ["c"]
    assert records[0]["messages"][1]["content"] == f'"{REPLY}"'
    assert report["dropped"] == {"not followed: length_constraints:number_words": 1, "no edit applies": 1,
                                 "no reference reply": 1}
    assert report["instructions"]["startend:quotation"] == {"prompts": 2, "kept": 1}


def test_committed_sft_data_is_what_the_command_writes(tmp_path, monkeypatch):
    """data/constraints_sft/ is rebuilt from data/constraints/ (request files read from the repository
    root, as the prompts name them) and compared byte for byte."""
    monkeypatch.chdir(DATA.parent)
    args = json.loads((DATA / "constraints_sft" / "report.json").read_text())["arguments"]
    assert main(["data", "conform", "--prompts", *args["prompts"], "--seed", str(args["seed"]),
                 "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "records.jsonl").read_bytes() == (DATA / "constraints_sft" / "records.jsonl").read_bytes()
    rows = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    truths = {q["id"]: q["ground_truth"] for q in map(json.loads, (DATA / "constraints" / "records.jsonl").open())}
    assert len(rows) >= 900 and all(all(ifeval.followed(r["messages"][-1]["content"], truths[r["id"]])) for r in rows)


def test_bad_prompts_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    write_jsonl(bad, [{"messages": [{"role": "user", "content": "2+2?"}], "ground_truth": "4", "verifier": "gsm8k"}])
    assert main(["data", "conform", "--prompts", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert f"{bad}:1: field 'verifier' must be 'ifeval'" in capsys.readouterr().err
    write_jsonl(bad, [{"messages": [{"role": "user", "content": "x"}], "verifier": "ifeval",
                       "ground_truth": truth(("startend:quotation", {}))}])
    assert main(["data", "conform", "--prompts", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert f"{bad}:1: field 'request_source' is missing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
