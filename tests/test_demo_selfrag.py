"""``posttrain demo selfrag``: held-out facts never in a training target; the summary's keys; a user's
facts file; the full demo's goals (slow)."""

import json

import pytest

import posttrain.demo_selfrag as demo
from posttrain.cli import main
from posttrain.rag import facts as F


def test_no_heldout_fact_is_in_a_training_target():
    facts = F.generate_facts(60, seed=0)
    train, heldout = demo.split(facts, seed=0)
    held_facts = {s for q in heldout for s in q["support"]}
    held_entities = {q["entity"] for q in heldout} - {None}
    for q in train:
        assert q["entity"] not in held_entities
        assert not set(q["support"]) & {f["text"] for f in facts if f["subject"] in held_entities}
        assert not any(s in demo.target(q) for s in held_facts if s not in q["support"])
    assert {q["kind"] for q in heldout} == {"single", "two_hop", "closed_book"}


def test_short_demo_writes_its_summary(tmp_path, monkeypatch):
    monkeypatch.setitem(demo.SFT, "max_steps", 8)
    monkeypatch.setitem(demo.SFT, "save_steps", 0)
    rows = [{"subject": f"Person{i}", "relation": "pet", "object": f"Pet{i}", "text": f"Person{i} owns a cat called Pet{i}."}
            for i in range(12)]
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["demo", "selfrag", "--facts", str(tmp_path / "facts.jsonl"), "--output", str(tmp_path / "d")]) == 0
    s = json.loads((tmp_path / "d" / "summary.json").read_text())
    for key in ("accuracy_with_retrieval", "accuracy_without_retrieval", "retrieval_rate_closed_book",
                "citation_precision"):
        assert key in s
    assert s["facts"] == 12 and s["heldout_questions"] == 3 + demo.EVAL_PER_KIND  # 3 held-out people, 100 sums
    assert (tmp_path / "d" / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["demo", "selfrag", "sft.max_steps=3"]) == 2  # no overrides for this demo


@pytest.mark.slow
def test_full_demo_meets_its_goals(tmp_path):
    s = demo.run_selfrag_demo(str(tmp_path / "d"))
    # measured 2026-11-30: 0.81 with retrieval, 0.03 without, closed-book retrieval 0.00, 276 s
    assert s["accuracy_with_retrieval"] >= s["accuracy_without_retrieval"] + 0.5
    assert s["accuracy_without_retrieval"] <= 0.1
    assert s["retrieval_rate_closed_book"] < 0.2
    assert s["citation_precision"] >= 0.8
