"""OpenScholar mode with a scripted engine: feedback that asks for information triggers retrieval,
the draft is revised, and citations are verified (a wrong one fixed, a missing one fixed or removed)."""

import json
import math

import pytest
from conftest import RAG_DOCS

from posttrain.inference.engine import Completion
from posttrain.rag.openscholar import EngineChecker, OpenScholar, OverlapChecker, parse_feedback, verify_citations


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


def test_feedback_retrieves_revises_and_citations_are_checked(fact_index):
    engine = Scripted({
        "Answer the question": ["Ana Lor was born in Ropa [1]. Ropa is a city in Kell [1]."],
        "List up to three": ["Feedback: the country of Ropa is wrong.\nSearch: Ropa Tivia river Sul", "No feedback."],
        "Revise": ["Ana Lor was born in Ropa [1]. Ropa is a city in Tivia [1]."]})
    system = OpenScholar(engine, fact_index, OverlapChecker(), k=1, n_retrieve=3, k_feedback=2, rounds=3)
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


def test_citation_repair_by_hand(fact_index):
    passages = [fact_index.passage(i) for i in range(3)]  # [1] Ana, [2] Ropa, [3] Bo
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


def test_rag_and_selfrag_data_commands(tmp_path, fact_index, tiny_model_dir, capsys):
    from posttrain.cli import main

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Where was Ana Lor born?", "answer": "Ropa", "kind": "single",
                                     "support": ["Ana Lor was born in Ropa."]}) + "\n")
    ix = str(fact_index.dir)
    assert main(["rag", "--mode", "openscholar", "--model", str(tiny_model_dir), "--index", ix, "--input",
                 str(questions), "--output", str(tmp_path / "a.jsonl"), "--checker", "overlap", "--rounds", "1",
                 "--max-new-tokens", "6", "--k", "2"]) == 0
    [answer] = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert answer["question"] == "Where was Ana Lor born?" and [p["title"] for p in answer["passages"]][0] == "Ana Lor"
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-2])
    assert metrics["n"] == 1 and "citation_precision" in metrics
    # Self-RAG decoding needs a model trained with the reflection tokens: one line, exit 2
    assert main(["rag", "--model", str(tiny_model_dir), "--index", ix, "--question", "Where?"]) == 2
    assert "lacks Self-RAG's reflection tokens" in capsys.readouterr().err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"messages": [{"role": "user", "content": "Where was Ana Lor born?"},
                                              {"role": "assistant", "content": "Ana Lor was born in Ropa."}],
                                 "support": ["Ana Lor was born in Ropa."], "answer": "Ropa"}) + "\n"
                     + json.dumps({"instruction": "Hi", "output": ""}) + "\n")
    assert main(["data", "selfrag", "--input", str(pairs), "--index", ix, "--output", str(tmp_path / "sr")]) == 2
    assert "pairs.jsonl:2: field 'output' must be a non-empty string" in capsys.readouterr().err
    pairs.write_text(pairs.read_text().splitlines()[0] + "\n")
    assert main(["data", "selfrag", "--input", str(pairs), "--index", ix, "--output", str(tmp_path / "sr"), "--k", "1"]) == 0
    [rec] = [json.loads(x) for x in (tmp_path / "sr" / "records.jsonl").read_text().splitlines()]
    assert rec["messages"][1]["content"].startswith("[Retrieval]<paragraph>Ana Lor\n")
    report = json.loads((tmp_path / "sr" / "report.json").read_text())
    assert report["stats"]["retrieval"] == 1 and report["command"] == "posttrain data selfrag"


def tiny_cross_encoder(path):
    """A sentence-transformers cross-encoder built in code: a 1-layer BERT with one output."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    torch.manual_seed(0)
    words = sorted({w.strip(".,?").lower() for d in RAG_DOCS for w in (d["title"] + " " + d["text"]).split()} | {"where"})
    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    BertForSequenceClassification(BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, num_labels=1)).save_pretrained(path)
    return str(path)


def test_rerankers(tmp_path, fact_index):
    from sentence_transformers import CrossEncoder

    from posttrain.rag.rerank import CrossEncoderReranker, EngineReranker

    passages = [fact_index.passage(i) for i in range(3)]
    model = tiny_cross_encoder(tmp_path / "ce")
    got = CrossEncoderReranker(model)("where was ana lor born", passages)
    want = CrossEncoder(model, device="cpu").predict([("where was ana lor born", f"{p['title']}\n{p['text']}")
                                                      for p in passages])
    assert got == pytest.approx([float(x) for x in want], abs=1e-6)

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [{"Yes": 7, "No": 8}[text], 99]}

    class Probs:
        tokenizer = Tok()

        def next_token_logprobs(self, prompts, ids):
            assert ids == [7, 8]
            return [[math.log(0.3), math.log(0.1)] if "kites" in p[0]["content"] else [math.log(0.1), math.log(0.3)]
                    for p in prompts]

    assert EngineReranker(Probs())("q", passages) == pytest.approx([0.25, 0.25, 0.75])

    class Replies:
        def generate(self, prompts, sampling):
            return [Completion("Yes" if "Tivia" in p[0]["content"] else "no", [1], "stop") for p in prompts]

    assert EngineReranker(Replies())("q", passages) == [0.0, 1.0, 0.0]
    system = OpenScholar(Scripted({}), fact_index, OverlapChecker(), k=1, n_retrieve=3, rerank=EngineReranker(Replies()))
    assert [p["doc_id"] for p in system._retrieve("Ana Lor Ropa")] == ["ropa"]
