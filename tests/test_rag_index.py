"""The retrieval datastore: chunking, BM25 equal to a brute-force float64 BM25 and to bm25s' own
in-memory index, the block-wise streaming build, dense and hybrid search, one-line errors."""

import json
import math
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from posttrain.errors import UserError
from posttrain.rag import index as rag_index
from posttrain.rag.index import Retriever, build_index, chunk_words

WORDS = ("river stone lantern orchard copper violet harbor meadow falcon quartz ember willow glacier "
         "saffron beacon thistle marble cobalt juniper tundra canyon lotus cinder prairie walnut heron "
         "basalt fern amber delta summit ridge pepper obsidian maple kestrel coral dune mist pine").split()


def corpus_file(tmp_path, n_docs=40, seed=0):
    rng = random.Random(seed)
    path = tmp_path / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(n_docs):
            text = " ".join(rng.choice(WORDS[:rng.randint(8, len(WORDS))]) for _ in range(rng.randint(5, 160)))
            f.write(json.dumps({"id": f"doc{i}", "title": f"{WORDS[i % len(WORDS)]} notes", "text": text}) + "\n")
    return path


def brute_force_bm25(passages: list[list[str]], query: list[str], k1=1.5, b=0.75) -> np.ndarray:
    """BM25 (Lucene) in float64, straight from the formula, over stemmed terms."""
    n = len(passages)
    avgdl = sum(len(p) for p in passages) / n
    df = Counter(t for p in passages for t in set(p))
    out = np.zeros(n)
    for j, p in enumerate(passages):
        tf = Counter(p)
        for t in query:
            if tf[t]:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                out[j] += idf * tf[t] / (tf[t] + k1 * (1 - b + b * len(p) / avgdl))
    return out


def stems(retriever: Retriever) -> list[list[str]]:
    inverse = {i: s for s, i in retriever.bm25.vocab_dict.items()}
    tok = rag_index.tokenizer()
    out = []
    for i in range(len(retriever)):
        p = retriever.passage(i)
        out.append([inverse[t] for t in next(tok.streaming_tokenize([f"{p['title']}\n{p['text']}"]))])
    return out


def test_chunk_words_overlap_by_hand():
    words = [f"w{i}" for i in range(10)]
    assert chunk_words(" ".join(words), 4, 1) == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]
    assert chunk_words("w0 w1 w2 w3 w4", 4, 1) == ["w0 w1 w2 w3", "w3 w4"]
    assert chunk_words("a b", 4, 2) == ["a b"]
    assert chunk_words("  ", 4, 1) == []


def test_bm25_equals_brute_force_and_bm25s(tmp_path):
    import bm25s

    manifest = build_index([str(corpus_file(tmp_path))], str(tmp_path / "ix"), chunk_size=50, overlap=10,
                           progress=False)
    r = Retriever(str(tmp_path / "ix"))
    assert manifest["passages"] == len(r) > manifest["documents"] == 40  # long documents were cut
    passages = stems(r)
    vocab = r.bm25.vocab_dict
    inverse = {i: t for t, i in vocab.items()}
    reference = bm25s.BM25(method="lucene")
    reference.index(bm25s.tokenization.Tokenized(ids=[[vocab[t] for t in p] for p in passages], vocab=vocab),
                    show_progress=False)
    rng = random.Random(1)
    for _ in range(20):
        query = " ".join(rng.sample(WORDS, rng.randint(1, 4)))
        terms = r.query_terms(query)
        expected = brute_force_bm25(passages, [inverse[t] for t in terms])
        got = np.asarray(r.bm25.get_scores_from_ids(terms), dtype=np.float64)
        # float32 weights (relative error 2**-24 each), summed over at most 4 terms in float32
        np.testing.assert_allclose(got, expected, rtol=4 * 2 ** -23, atol=0)
        np.testing.assert_allclose(got, reference.get_scores_from_ids(terms), rtol=4 * 2 ** -23, atol=0)
        hits = r.search(query, k=5, mode="bm25")
        assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
        top = np.sort(expected)[::-1][:5]
        np.testing.assert_allclose([h["score"] for h in hits], top[top > 0], rtol=4 * 2 ** -23)
        for h in hits:
            assert math.isclose(h["score"], expected[h["id"]], rel_tol=4 * 2 ** -23)
    assert r.search("zebra unknown words", k=3) == []


def test_block_wise_build_is_identical(tmp_path, monkeypatch):
    corpus = [str(corpus_file(tmp_path))]
    build_index(corpus, str(tmp_path / "one"), chunk_size=30, overlap=5, progress=False)
    monkeypatch.setattr(rag_index, "BLOCK_PASSAGES", 3)  # many blocks, terms split across them
    build_index(corpus, str(tmp_path / "many"), chunk_size=30, overlap=5, progress=False)
    for name in ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy", "passages.jsonl",
                 "offsets.npy", "vocab.index.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes(), name


def tiny_encoder(path):
    """A sentence-transformers model built in code: a 2-layer BERT over a word-level vocabulary + mean pooling."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    (path / "bert").mkdir(parents=True)
    (path / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(path / "bert" / "vocab.txt")).save_pretrained(path / "bert")
    BertModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256)).save_pretrained(path / "bert")
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer
    word = Transformer(str(path / "bert"), max_seq_length=128)
    SentenceTransformer(modules=[word, Pooling(32, "mean")], device="cpu").save(str(path / "st"))
    return str(path / "st")


def test_dense_and_hybrid_search(tmp_path, monkeypatch):
    encoder = tiny_encoder(tmp_path / "encoder")
    build_index([str(corpus_file(tmp_path, n_docs=12))], str(tmp_path / "ix"), chunk_size=40, overlap=8,
                dense=encoder, batch_size=5, progress=False)
    r = Retriever(str(tmp_path / "ix"))
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(encoder, device="cpu")
    texts = [f"{p['title']}\n{p['text']}" for p in map(r.passage, range(len(r)))]
    emb = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(r.embeddings, emb, atol=1e-6)  # batches of 5 = one batch of all
    query = "copper lantern harbor"
    sims = emb.astype(np.float64) @ model.encode([query], normalize_embeddings=True)[0].astype(np.float64)
    dense = r.search(query, k=4, mode="dense")
    assert [h["id"] for h in dense] == list(np.argsort(-sims, kind="stable")[:4])
    # hybrid = reciprocal-rank fusion of the two rankings, by hand
    monkeypatch.setattr(Retriever, "bm25_ranking", lambda self, q, k: [(3, 9.0), (1, 5.0), (0, 1.0)])
    monkeypatch.setattr(Retriever, "dense_ranking", lambda self, q, k: [(1, 0.9), (2, 0.8)])
    hybrid = r.search(query, k=3)
    assert [h["id"] for h in hybrid] == [1, 3, 2]
    assert hybrid[0]["score"] == pytest.approx(1 / 62 + 1 / 61)
    assert hybrid[1]["score"] == pytest.approx(1 / 61)
    assert hybrid[2]["score"] == pytest.approx(1 / 62)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "posttrain.cli", "data", "index", *args], cwd=cwd,
                          capture_output=True, text=True)


def test_bad_input_one_line_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "notext.jsonl").write_text('{"text": "fine words"}\n{"title": "x"}\n')
    for corpus, message in [("empty.jsonl", "--corpus: no text to index in empty.jsonl"),
                            ("notext.jsonl", "notext.jsonl:2: field 'text' must be a non-empty string"),
                            ("missing.jsonl", "missing.jsonl: file not found")]:
        p = run_cli("--corpus", corpus, "--output", "ix", cwd=tmp_path)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1] == f"error: {message}"
        assert not (tmp_path / "ix").exists() and not list(tmp_path.glob(".ix.*"))  # nothing half-written
    p = run_cli("--corpus", "notext.jsonl", "--output", "ix", "--overlap", "100", cwd=tmp_path)
    assert p.returncode == 2 and "--overlap must be" in p.stderr
    with pytest.raises(UserError, match="no index here"):
        Retriever(str(tmp_path / "nowhere"))
