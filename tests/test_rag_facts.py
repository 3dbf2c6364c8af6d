"""rag_facts: the generated knowledge base, its questions (hand-checked on a small user file), the
entity split, answer matching and the citation metrics by hand."""

import json

import pytest

from posttrain.errors import UserError
from posttrain.rag import facts as F


def test_generated_facts_are_seeded_complete_and_unambiguous():
    a, b = F.generate_facts(24, seed=3), F.generate_facts(24, seed=3)
    assert a == b and a != F.generate_facts(24, seed=4)
    assert {f["relation"] for f in a} == set(F.RELATIONS)
    pairs = [(f["subject"], f["relation"]) for f in a]
    assert len(pairs) == len(set(pairs))  # one object per subject and relation
    assert all(f["text"].startswith(f["subject"]) or f["relation"] == "river" for f in a)
    docs = F.documents(a)
    assert sorted(d["title"] for d in docs) == sorted({f["subject"] for f in a})
    for f in a:  # every sentence is in exactly its subject's document
        assert [d["title"] for d in docs if f["text"] in d["text"]] == [f["subject"]]


def test_questions_from_user_facts_by_hand(tmp_path):
    path = tmp_path / "facts.jsonl"
    rows = [{"subject": "Orla Venn", "relation": "mentor", "object": "Ida Moss", "text": "Orla Venn was taught by Ida Moss."},
            {"subject": "Ida Moss", "relation": "home_town", "object": "Kelp Bay", "text": "Ida Moss lives in Kelp Bay."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    qs = F.questions(F.read_facts(str(path)), n_closed_book=1, seed=0)
    assert [(q["question"], q["answer"], q["kind"]) for q in qs[:3]] == [
        ("What is the mentor of Orla Venn?", "Ida Moss", "single"),
        ("What is the home town of Ida Moss?", "Kelp Bay", "single"),
        ("What is the home town of the mentor of Orla Venn?", "Kelp Bay", "two_hop")]
    assert qs[2]["support"] == ["Orla Venn was taught by Ida Moss.", "Ida Moss lives in Kelp Bay."]
    a, b = (int(x) for x in qs[3]["question"][len("What is "):-1].split(" + "))
    assert qs[3]["kind"] == "closed_book" and qs[3]["answer"] == str(a + b) and qs[3]["support"] == []
    assert [q["id"] for q in qs] == [0, 1, 2, 3]


def test_generated_two_hop_questions_chain_two_documents():
    facts = F.generate_facts(12, seed=0)
    index = {(f["subject"], f["relation"]): f["object"] for f in facts}
    two = [q for q in F.questions(facts) if q["kind"] == "two_hop"]
    assert len(two) == 12 + 12 + 3  # born_in->country and works_for->based_in per person, based_in->country per company
    for q in two:
        s = q["entity"]
        if q["question"].startswith("In which country was"):
            assert q["answer"] == index[(index[(s, "born_in")], "country")]


def test_split_by_entity_is_disjoint():
    qs = F.questions(F.generate_facts(20, seed=1), n_closed_book=8)
    train, heldout = F.split_by_entity(qs, 0.25, seed=0)
    assert len(train) + len(heldout) == len(qs)
    assert not {q["entity"] for q in train} & {q["entity"] for q in heldout} - {None}
    assert sum(q["kind"] == "closed_book" for q in heldout) == 2


def test_answer_matching_and_citation_metrics_by_hand():
    assert F.correct("It is Negifi.", "negifi") and F.correct("the cello, surely", "the cello")
    assert not F.correct("Negifia", "Negifi") and not F.correct("", "42")
    support = ["Ana was born in Ro.", "Ro is a city in Tia."]
    cited = ["Ana was born in  Ro. Ana plays the harp.", "Bo makes kites.", "Ro is a city in Tia. The river Su flows"]
    assert F.citation_scores(cited, support) == (2 / 3, 1.0)
    assert F.citation_scores(cited[1:2], support) == (0.0, 0.0)
    assert F.citation_scores([], support) == (None, 0.0) and F.citation_scores(cited, []) == (0.0, None)
    results = [{"kind": "single", "correct": True, "retrieved": True, "precision": 1.0, "recall": 1.0},
               {"kind": "single", "correct": False, "retrieved": True, "precision": 0.5, "recall": None},
               {"kind": "closed_book", "correct": True, "retrieved": False, "precision": None, "recall": None},
               {"kind": "closed_book", "correct": True, "retrieved": True, "precision": None, "recall": None}]
    m = F.metrics(results)
    assert m["accuracy"] == 0.75 and m["accuracy_single"] == 0.5 and m["accuracy_closed_book"] == 1.0
    assert m["retrieval_rate_single"] == 1.0 and m["retrieval_rate_closed_book"] == 0.5
    assert m["citation_precision"] == 0.75 and m["citation_recall"] == 1.0


def test_bad_facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text('{"subject": "A", "relation": "r", "object": "B", "text": "A r B."}\n{"subject": "A", "relation": "r"}\n')
    with pytest.raises(UserError, match=r"facts.jsonl:2: field 'object' must be a non-empty string"):
        F.read_facts(str(path))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="no facts"):
        F.read_facts(str(tmp_path / "empty.jsonl"))


class Reader:
    """An OpenScholar engine that answers by copying passage [1] with its citation; no feedback."""

    def generate(self, prompts, sampling):
        from posttrain.inference.engine import Completion

        out = []
        for p in prompts:
            text = p[0]["content"]
            if text.startswith("Answer the question") and "[1] " in text:
                first = text.split("[1] ", 1)[1].split("\n", 2)[1]  # the passage's text, after its title line
                out.append(Completion(f"{first} [1]", [1], "stop"))
            elif text.startswith("Answer the question"):
                out.append(Completion("I do not know.", [1], "stop"))
            else:
                out.append(Completion("No feedback.", [1], "stop"))
        return out


def test_eval_task_instances_mix_kinds_and_read_user_facts(tmp_path):
    from posttrain.eval.tasks import TASKS
    from posttrain.eval.tasks.base import load

    task = TASKS["rag_facts"]
    first = load(task, None, 30)
    assert [i["index"] for i in first] == list(range(30)) and len({i["kind"] for i in first}) == 3
    assert first == load(task, None, 30)  # seeded
    path = tmp_path / "facts.jsonl"
    path.write_text('{"subject": "Ana", "relation": "home", "object": "Ropa", "text": "Ana lives in Ropa."}\n'
                    '{"subject": "Ropa", "relation": "nation", "object": "Kell", "text": "Ropa lies in Kell."}\n')
    mine = load(task, str(path), None)
    assert sorted(i["prompt"] for i in mine if i["kind"] != "closed_book") == [
        "What is the home of Ana?", "What is the nation of Ropa?", "What is the nation of the home of Ana?"]


def test_eval_task_scores_a_reader_against_what_bm25_found(tmp_path):
    """The task indexes the base, asks every question and scores: a reader that copies the first
    passage is right exactly where that passage states the answer, and its citation is precise
    exactly where the passage holds the supporting sentence. (Arithmetic finds no passage.)"""
    from posttrain.eval.tasks import rag_facts
    from posttrain.eval.tasks.base import load
    from posttrain.rag.index import Retriever

    instances = load(rag_facts.TASK, None, 40)
    samples = rag_facts.samples(Reader(), instances, None, tmp_path / "rag", 64)
    retriever = Retriever(str(tmp_path / "rag" / "index"))
    for inst, s in zip(instances, samples):
        hits = retriever.search(inst["prompt"], 20)
        top = hits[0]["text"] if hits else ""
        assert s["system"] == "openscholar" and s["retrieved"] == bool(hits)
        assert s["score"] == float(F.correct(top, inst["ground_truth"]))
        if inst["support"]:
            assert s["precision"] == float(any(F.holds(top, x) for x in inst["support"]))
    m = rag_facts.metrics(samples)
    assert m["accuracy_single"] >= 0.9 and m["accuracy_closed_book"] == 0.0
    assert set(m) >= {"accuracy", "accuracy_two_hop", "retrieval_rate_single", "citation_precision", "citation_recall"}


def test_eval_task_picks_self_rag_for_a_model_with_reflection_tokens():
    from test_selfrag import ScriptedEngine, TinyTokenizer

    from posttrain.eval.tasks import rag_facts

    assert rag_facts.system_of(ScriptedEngine(tokenizer=TinyTokenizer()), None, 64)[0] == "selfrag"
    assert rag_facts.system_of(Reader(), None, 64)[0] == "openscholar"


def test_posttrain_eval_runs_rag_facts(tmp_path, tiny_model_dir):
    from posttrain.eval.runner import evaluate

    results = evaluate(str(tiny_model_dir), ["rag_facts"], tmp_path / "out", limit=4, max_new_tokens=8)
    assert results["rag_facts"]["instances"] == 4 and 0.0 <= results["rag_facts"]["accuracy"] <= 1.0
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [s["system"] for s in samples] == ["openscholar"] * 4 and all(s["passages"] for s in samples if s["kind"] != "closed_book")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"subject": "A"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: field 'relation'"):
        evaluate(str(tmp_path / "no-model"), ["rag_facts"], tmp_path / "out2", data={"rag_facts": str(bad)})
