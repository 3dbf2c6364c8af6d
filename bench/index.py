"""Retrieval datastore: posttrain's streaming index build and search against bm25s used directly.

    python bench/index.py                          # 1,000,000 passages, 1,000 queries
    python bench/index.py --passages 100000 --dense-passages 2000

The corpus is synthetic (no 1M-passage corpus is on this machine): documents of 300 words drawn
from a Zipf distribution (exponent 1.1) over 200,000 made-up words, cut into passages of 100 words
overlapping by 20 (4 per document). The alternative is what a user would write with bm25s alone:
read every document, cut the same passages, ``bm25s.tokenize`` them all, ``BM25().index``, ``save``;
it holds every passage's tokens in memory. Each build runs in its own process (peak RSS is that
process's). Queries: 3 words from the middle of the Zipf ranks, top 10; posttrain's ``Retriever``
searches its memory-mapped index one query at a time, bm25s its in-memory index (one query at a time
and all at once). The top-10 scores of the two must agree (checked). With ``--dense-passages N`` the
first N passages are also embedded with all-MiniLM-L6-v2 (passages/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORDS_PER_DOC, CHUNK, OVERLAP, VOCAB = 300, 100, 20, 200_000


def words(seed: int = 0) -> np.ndarray:
    """``VOCAB`` distinct made-up words of 2-4 consonant-vowel syllables."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    rows, lengths = rng.integers(0, len(syllables), size=(2 * VOCAB, 4)), rng.integers(2, 5, size=2 * VOCAB)
    made = dict.fromkeys("".join(syllables[i] for i in row[:n]) for row, n in zip(rows.tolist(), lengths.tolist()))
    return np.array(sorted(made)[:VOCAB])


def write_corpus(path: Path, passages: int, seed: int = 0) -> None:
    vocab = words(seed)
    rng = np.random.default_rng(seed + 1)
    docs = passages // 4
    with open(path, "w") as f:
        for start in range(0, docs, 10_000):
            n = min(10_000, docs - start)
            ranks = rng.zipf(1.1, size=(n, WORDS_PER_DOC))
            ranks = np.where(ranks <= VOCAB, ranks - 1, rng.integers(0, VOCAB, size=ranks.shape))
            for i, row in enumerate(vocab[ranks]):
                f.write(json.dumps({"id": f"d{start + i}", "title": "", "text": " ".join(row)}) + "\n")


def queries(n: int, seed: int = 2) -> list[str]:
    vocab = words(0)
    rng = np.random.default_rng(seed)
    return [" ".join(vocab[rng.integers(100, 5000, size=3)]) for _ in range(n)]


def child_posttrain(corpus: str, out: str) -> dict:
    from posttrain.rag.index import build_index

    t = time.perf_counter()
    m = build_index([corpus], out, CHUNK, OVERLAP, progress=False)
    return {"seconds": time.perf_counter() - t, "passages": m["passages"]}


def child_bm25s(corpus: str, out: str) -> dict:
    import bm25s
    import Stemmer

    from posttrain.rag.index import chunk_words

    t = time.perf_counter()
    texts = []
    with open(corpus) as f:
        for line in f:
            texts += chunk_words(json.loads(line)["text"], CHUNK, OVERLAP)
    tokens = bm25s.tokenize(texts, stopwords="en", stemmer=Stemmer.Stemmer("english"), show_progress=False)
    retriever = bm25s.BM25(method="lucene")
    retriever.index(tokens, show_progress=False)
    retriever.save(out, show_progress=False)
    return {"seconds": time.perf_counter() - t, "passages": len(texts)}


def run_child(kind: str, corpus: str, out: str) -> dict:
    code = (f"import sys, json, resource; sys.path.insert(0, {str(Path(__file__).parent)!r}); import index as b; "
            f"r = b.child_{kind}({corpus!r}, {out!r}); "
            "r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; print(json.dumps(r))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(p.stdout.strip().splitlines()[-1])


def search_speed(ix: str, bm25s_dir: str, qs: list[str]) -> dict:
    import bm25s
    import Stemmer

    from posttrain.rag.index import Retriever

    r = Retriever(ix)
    r.search(qs[0], k=10, mode="bm25")
    t = time.perf_counter()
    ours = [r.search(q, k=10, mode="bm25") for q in qs]
    ours_s = time.perf_counter() - t

    load = time.perf_counter()
    ref = bm25s.BM25.load(bm25s_dir, show_progress=False)
    load = time.perf_counter() - load
    stemmer = Stemmer.Stemmer("english")
    t = time.perf_counter()
    single = [ref.retrieve(bm25s.tokenize([q], stopwords="en", stemmer=stemmer, show_progress=False), k=10,
                           show_progress=False) for q in qs]
    single_s = time.perf_counter() - t
    t = time.perf_counter()
    tokens = bm25s.tokenize(qs, stopwords="en", stemmer=stemmer, show_progress=False)
    ref.retrieve(tokens, k=10, show_progress=False, n_threads=1)
    batch_s = time.perf_counter() - t
    for mine, theirs in zip(ours, single):
        np.testing.assert_allclose([h["score"] for h in mine], theirs.scores[0][:len(mine)], rtol=1e-5)
    return {"posttrain_qps": len(qs) / ours_s, "bm25s_qps": len(qs) / single_s, "bm25s_batch_qps": len(qs) / batch_s,
            "bm25s_load_s": load, "posttrain_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def dense_speed(corpus: str, n: int, work: Path) -> dict:
    from posttrain.rag.index import build_index

    small = work / "small.jsonl"
    with open(corpus) as f, open(small, "w") as g:
        for _ in range(max(n // 4, 1)):
            g.write(f.readline())
    t = time.perf_counter()
    m = build_index([str(small)], str(work / "dense"), CHUNK, OVERLAP, dense="all-minilm-l6-v2", progress=False)
    return {"passages": m["passages"], "seconds": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passages", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dense-passages", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = str(work / "corpus.jsonl")
        t = time.perf_counter()
        write_corpus(Path(corpus), args.passages)
        print(f"corpus: {args.passages // 4:,} documents, {os.path.getsize(corpus) / 2**20:,.0f} MiB "
              f"({time.perf_counter() - t:.0f} s to write)", flush=True)
        ours = run_child("posttrain", corpus, str(work / "ix"))
        theirs = run_child("bm25s", corpus, str(work / "bm25s"))
        assert ours["passages"] == theirs["passages"]
        size = sum(f.stat().st_size for f in (work / "ix").iterdir()) / 2**20
        print(f"\n{'build':<28}{'seconds':>10}{'passages/s':>14}{'peak RSS MiB':>14}")
        for name, r in (("posttrain (streaming)", ours), ("bm25s, all in memory", theirs)):
            print(f"{name:<28}{r['seconds']:>10.1f}{r['passages'] / r['seconds']:>14,.0f}{r['peak_rss_mb']:>14,.0f}")
        print(f"ratio (bm25s time / posttrain time): {theirs['seconds'] / ours['seconds']:.2f}x; "
              f"RSS ratio {theirs['peak_rss_mb'] / ours['peak_rss_mb']:.1f}x; index on disk {size:,.0f} MiB "
              f"(passages.jsonl included)")
        s = search_speed(str(work / "ix"), str(work / "bm25s"), queries(args.queries))
        print(f"\nsearch, top 10 of {ours['passages']:,} passages, {args.queries} queries of 3 words (same scores):")
        print(f"  posttrain Retriever (memory-mapped): {s['posttrain_qps']:,.0f} queries/s, "
              f"process RSS {s['posttrain_rss_mb']:,.0f} MiB")
        print(f"  bm25s in memory, one at a time:     {s['bm25s_qps']:,.0f} queries/s (load {s['bm25s_load_s']:.1f} s)")
        print(f"  bm25s in memory, one batch:         {s['bm25s_batch_qps']:,.0f} queries/s")
        if args.dense_passages:
            d = dense_speed(corpus, args.dense_passages, work)
            print(f"\ndense embeddings (all-MiniLM-L6-v2): {d['passages']:,} passages in {d['seconds']:.1f} s "
                  f"({d['passages'] / d['seconds']:,.0f} passages/s including BM25 and model load)")


if __name__ == "__main__":
    main()
