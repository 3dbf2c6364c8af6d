"""``rag_facts``: questions about made-up entities that no model can know, answered with retrieval.

Data: a generated knowledge base (``PEOPLE`` people, seed 0; posttrain.rag.facts) or
``--data rag_facts=FACTS.jsonl`` (records ``{"subject", "relation", "object", "text"}``). Its
documents are indexed with BM25 into ``OUTPUT/rag_facts/index`` at evaluation time. Instances: every
single-hop and two-hop question the facts allow and ``CLOSED_BOOK`` arithmetic controls, in a seeded
order (so ``--limit`` takes a mix of kinds).

The system that answers (``samples``): Self-RAG's critique-guided decoding with adaptive retrieval
when the model's vocabulary has the reflection tokens (a model trained with ``add_tokens: [selfrag]``)
and the engine gives next-token log-probabilities (the local transformers engine); otherwise
OpenScholar mode (one self-feedback round, citations checked by word overlap), which any engine runs.

Metrics: ``accuracy`` overall and per kind, ``retrieval_rate`` per kind, ``citation_precision`` and
``citation_recall`` (posttrain.rag.facts.metrics).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from posttrain.eval.tasks.base import Task
from posttrain.rag import facts as F

PEOPLE = 50
CLOSED_BOOK = 40


def _facts(path: str | None) -> list[dict]:
    return F.read_facts(path) if path else F.generate_facts(PEOPLE, seed=0)


def load_instances(path: str | None) -> list[dict]:
    qs = F.questions(_facts(path), n_closed_book=CLOSED_BOOK, seed=0)
    random.Random(0).shuffle(qs)
    return [{"id": q["id"], "prompt": q["question"], "ground_truth": q["answer"], "kind": q["kind"],
             "support": q["support"], "text": q["question"]} for q in qs]


def metrics(samples: list[dict]) -> dict:
    got = F.metrics([{k: s[k] for k in ("kind", "retrieved", "precision", "recall")} | {"correct": s["score"] > 0}
                     for s in samples])
    return {k: v for k, v in got.items() if k != "n" and v is not None}


def system_of(engine, retriever, max_new_tokens: int):
    """Self-RAG decoding for a model with reflection tokens on an engine with next-token log-probs,
    else OpenScholar mode."""
    from posttrain.rag import selfrag as sr

    tokenizer = getattr(engine, "tokenizer", None)
    if hasattr(engine, "next_token_logprobs") and tokenizer is not None and sr.RETRIEVAL in tokenizer.get_vocab():
        from posttrain.rag.selfrag_decoding import SelfRAG

        return "selfrag", SelfRAG(engine, retriever, k=3, mode="adaptive", max_segment_tokens=min(max_new_tokens, 64))
    from posttrain.rag.openscholar import OpenScholar, OverlapChecker

    return "openscholar", OpenScholar(engine, retriever, OverlapChecker(), k=3, rounds=1, max_new_tokens=max_new_tokens)


def samples(engine, instances: list[dict], path: str | None, workdir: Path, max_new_tokens: int) -> list[dict]:
    """Index the knowledge base's documents in ``workdir``, answer every instance, score the answers."""
    from posttrain.atomic import write_text
    from posttrain.rag.index import Retriever, build_index

    corpus = workdir / "corpus.jsonl"
    write_text(corpus, "".join(json.dumps(d) + "\n" for d in F.documents(_facts(path), seed=0)))
    build_index([str(corpus)], str(workdir / "index"), progress=False)
    name, system = system_of(engine, Retriever(str(workdir / "index")), max_new_tokens)
    answers = system.answer([i["prompt"] for i in instances])
    out = []
    for inst, a in zip(instances, answers):
        s = F.score(a, {"answer": inst["ground_truth"], "kind": inst["kind"], "support": inst["support"]})
        out.append({"task": TASK.name, "id": inst["id"], "index": inst["index"], "prompt": inst["prompt"],
                    "output": a["text"], "extracted": None, "ground_truth": inst["ground_truth"],
                    "score": float(s["correct"]), "kind": s["kind"], "retrieved": s["retrieved"],
                    "precision": s["precision"], "recall": s["recall"], "system": name,
                    "passages": [p["title"] for p in a["passages"]]})
    return out


TASK = Task("rag_facts", ("", None, "train"), kind="rag", max_new_tokens=128, metrics=metrics,
            loader=load_instances,
            description="questions about generated entities answered with retrieval (Self-RAG or OpenScholar)")
