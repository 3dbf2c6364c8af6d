"""OpenScholar mode with a scripted engine: feedback that asks for information triggers retrieval,
the draft is revised, and citations are verified (a wrong one fixed, a missing one fixed or removed)."""

import json

import pytest

from posttrain.inference.engine import Completion
from posttrain.rag.index import Retriever, build_index
from posttrain.rag.openscholar import EngineChecker, OpenScholar, OverlapChecker, parse_feedback, verify_citations

DOCS = [{"id": "ana", "title": "Ana Lor", "text": "Ana Lor was born in Ropa. Ana Lor plays the harp."},
        {"id": "ropa", "title": "Ropa", "text": "Ropa is a city in Tivia. The river Sul flows through Ropa."},
        {"id": "bo", "title": "Bo Fen", "text": "Bo Fen makes kites. Bo Fen was born in Kell."}]


@pytest.fixture()
def index(tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    build_index([str(tmp_path / "docs.jsonl")], str(tmp_path / "ix"), progress=False)
    return Retriever(str(tmp_path / "ix"))


class Scripted:
    """Replies in order per prompt kind; records every prompt."""

    def __init__(self, replies: dict[str, list[str]]):
        self.replies, self.prompts = {k: list(v) for k, v in replies.items()}, []

    def generate(self, prompts, sampling):
        out = []
        for p in prompts:
            text = p[0]["content"]
            self.prompts.append(text)
            kind = next(k for k in ("Revise", "List up to three", "Does the passage", "Answer the question")
                        if k in text.split("\n")[0])
            out.append(Completion(self.replies[kind].pop(0), [1], "stop"))
        return out


def test_feedback_retrieves_revises_and_citations_are_checked(index):
    engine = Scripted({
        "Answer the question": ["Ana Lor was born in Ropa [1]. Ropa is a city in Kell [1]."],
        "List up to three": ["Feedback: the country of Ropa is wrong.\nSearch: Ropa Tivia river Sul", "No feedback."],
        "Revise": ["Ana Lor was born in Ropa [1]. Ropa is a city in Tivia [1]."]})
    system = OpenScholar(engine, index, OverlapChecker(), k=1, n_retrieve=3, k_feedback=2, rounds=3)
    [r] = system.answer(["Where was Ana Lor born, and in which country is that?"])
    assert [p["doc_id"] for p in r["passages"]] == ["ana", "ropa"]  # the search added Ropa's passage
    assert r["searches"] == ["Ropa Tivia river Sul"]
    assert r["feedback"] == [["the country of Ropa is wrong."]]
    assert r["drafts"] == ["Ana Lor was born in Ropa [1]. Ropa is a city in Kell [1].",
                           "Ana Lor was born in Ropa [1]. Ropa is a city in Tivia [1]."]
    # the revision cites [1] for a sentence only passage 2 supports: fixed
    assert r["text"] == "Ana Lor was born in Ropa [1]. Ropa is a city in Tivia [2]."
    assert (r["fixed"], r["removed"], r["cited"]) == (1, 0, [1, 2])
    revise_prompt = next(p for p in engine.prompts if p.startswith("Revise"))
    assert "[2] Ropa\nRopa is a city in Tivia." in revise_prompt and "- the country of Ropa is wrong." in revise_prompt
    assert sum("List up to three" in p for p in engine.prompts) == 2  # the second round said no feedback


def test_citation_repair_by_hand(index):
    passages = [index.passage(i) for i in range(3)]  # [1] Ana, [2] Ropa, [3] Bo
    text = "Ana Lor was born in Ropa. [2] Bo Fen makes kites [7]. Bo Fen plays the oboe [3]. Ropa is in Tivia."
    out, fixed, removed = verify_citations(text, passages, OverlapChecker())
    assert out == "Ana Lor was born in Ropa [1]. Bo Fen makes kites [3]. Bo Fen plays the oboe. Ropa is in Tivia."
    assert (fixed, removed) == (2, 1)


def test_engine_checker_and_feedback_parsing():
    class YesNo:
        def generate(self, prompts, sampling):
            return [Completion("Yes." if "kites" in p[0]["content"] else "no", [1], "stop") for p in prompts]

    assert EngineChecker(YesNo()).supports([("Bo makes kites.", "p"), ("Bo sings.", "p")]) == [True, False]
    assert parse_feedback("- Feedback: add dates\nSearch: Ropa founding\nFeedback:\nnoise") == (["add dates"],
                                                                                                 ["Ropa founding"])
    assert parse_feedback("No feedback.") == ([], [])
