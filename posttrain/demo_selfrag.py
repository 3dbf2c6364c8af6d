"""``posttrain demo selfrag``: Self-RAG on a tiny model trained from scratch, about facts no model knows.

1. **Facts**: a generated ``rag_facts`` knowledge base (or the user's ``--facts`` file), one document
   per entity, indexed with BM25 (``posttrain data index``).
2. **Questions** split by entity: every held-out question is about an entity no training question is
   about, and a training question whose answer states a held-out entity's fact is dropped, so no
   held-out fact is in any training target. (Passages read as context in training may mention held-out
   entities; they are never trained on.)
3. **Self-RAG data** for the training questions (``posttrain data selfrag --critic rules --negatives 0.25``):
   answers are the supporting sentences (``2 + 3 = 5.`` for arithmetic), with passages and reflection
   tokens; a quarter of the records with an irrelevant passage among their retrieved ones are also
   written with that passage, labelled ``[Irrelevant]``.
4. **SFT** of a tiny Llama built from scratch (a BPE tokenizer trained on the documents and the
   training data), with the reflection tokens added (``add_tokens: [selfrag]``).
5. **Evaluation** on the held-out questions, with Self-RAG decoding: adaptive retrieval, and retrieval
   never (the model alone). Metrics per ``posttrain.rag.facts``.

``summary.json`` holds ``accuracy_with_retrieval``, ``accuracy_without_retrieval``,
``retrieval_rate_closed_book``, ``citation_precision`` and the metrics per kind; ``summary.png``
plots accuracy per question kind with and without retrieval. Re-running skips the finished SFT.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from posttrain.atomic import write_json, write_text
from posttrain.rag import facts as F
from posttrain.util import log

SFT = {"chat_template": "tulu", "max_seq_length": 256, "packing": True, "per_device_train_batch_size": 32,
       "learning_rate": 3e-3, "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "max_steps": 400, "save_steps": 100,
       "logging_steps": 20, "add_tokens": ["selfrag"], "decontaminate_against": []}
# Many people, each fact trained on about once: memorising the training facts cannot lower the loss
# much, reading the passage does (a tiny model trained for many epochs on few facts memorises them and
# ignores the passage: measured, see docs/rag.md).
PEOPLE = 1500  # generated people (and a quarter as many cities, companies, rivers)
NEGATIVES = 0.25  # share of records also shown with an irrelevant passage: relevance must be judged
EVAL_PER_KIND = 100  # held-out questions of each kind evaluated (the first, in a seeded order)
# 3 layers: 4 reached 0.78 in 327 s; 3 reached 0.81 in 276 s (copying emerged no later; measured)
TINY = {"vocab_size": 600, "hidden_size": 128, "num_layers": 3, "num_heads": 4, "num_kv_heads": 4}


def target(q: dict) -> str:
    """The answer a training question is taught: its supporting sentences, or the worked sum."""
    return " ".join(q["support"]) if q["support"] else f"{q['question'][len('What is '):-1]} = {q['answer']}."


def split(facts: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    qs = F.questions(facts, n_closed_book=4 * EVAL_PER_KIND, seed=seed)
    train, heldout = F.split_by_entity(qs, 0.25, seed)
    held = {q["entity"] for q in heldout} - {None}
    subject = {f["text"]: f["subject"] for f in facts}
    rng = random.Random(seed)
    rng.shuffle(heldout)
    kept = []
    for kind in ("single", "two_hop", "closed_book"):
        kept += [q for q in heldout if q["kind"] == kind][:EVAL_PER_KIND]
    return [q for q in train if not any(subject[s] in held for s in q["support"])], kept


def evaluate(model_dir: Path, retriever, heldout: list[dict], mode: str) -> tuple[dict, list[dict]]:
    from posttrain.inference.engine import TransformersEngine
    from posttrain.rag.selfrag_decoding import SelfRAG

    rag = SelfRAG(TransformersEngine.load(str(model_dir), batch_size=64), retriever, k=3, mode=mode, beam=2,
                  max_segments=3, max_segment_tokens=48)
    answers = rag.answer([q["question"] for q in heldout])
    results = []
    for q, a in zip(heldout, answers):
        results.append({"id": q["id"], "question": q["question"], "answer": q["answer"], "output": a["text"],
                        **F.score(a, q), "passages": [p["title"] for p in a["passages"]]})
    return F.metrics(results), results


def plot(summary: dict, path: Path) -> None:
    from posttrain.eval import plots

    kinds = ["single", "two_hop", "closed_book"]
    fig, ax = plots.figure()
    for j, (mode, label) in enumerate((("with_retrieval", "adaptive retrieval"), ("without_retrieval", "no retrieval"))):
        ax.bar([x + (j - 0.5) * 0.4 for x in range(3)], [summary[mode].get(f"accuracy_{k}", 0) for k in kinds],
               width=0.4, label=label)
    ax.set_xticks(range(3), ["single-hop", "two-hop", "closed-book"])
    ax.set_ylabel("held-out accuracy")
    ax.set_title("posttrain demo selfrag: questions about facts never trained on")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    plots.save(fig, path)


def run_selfrag_demo(out: str = "runs/demo-selfrag", facts_file: str | None = None, seed: int = 0) -> dict:
    from posttrain.config import SFTConfig
    from posttrain.config_io import load_config
    from posttrain.models import build_tiny
    from posttrain.rag.index import Retriever, build_index
    from posttrain.rag.selfrag import RuleCritic, build_records
    from posttrain.train.sft import run_sft

    started = time.time()
    root = Path(out)
    facts = F.read_facts(facts_file) if facts_file else F.generate_facts(PEOPLE, seed)
    docs = F.documents(facts, seed)
    write_text(root / "data" / "corpus.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
    build_index([str(root / "data" / "corpus.jsonl")], str(root / "index"), progress=False)
    retriever = Retriever(str(root / "index"))
    train, heldout = split(facts, seed)
    records, stats = build_records([{"instruction": q["question"], "output": target(q), "support": q["support"],
                                     "answer": q["answer"], "license": F.LICENSE} for q in train],
                                   retriever, RuleCritic(), k=3, negatives=NEGATIVES)
    write_text(root / "data" / "selfrag_sft.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write_text(root / "data" / "heldout.jsonl", "".join(json.dumps(q) + "\n" for q in heldout))
    log(f"demo selfrag: {len(facts)} facts, {len(docs)} documents; {len(records)} training records "
        f"({stats.get('retrieval', 0)} retrieving segments), {len(heldout)} held-out questions")
    base = root / "tiny-base"
    if not (base / "config.json").is_file():
        texts = [d["text"] for d in docs] + [r["messages"][0]["content"] + " " + r["messages"][1]["content"]
                                             for r in records]
        build_tiny(base, texts, seed=seed, **TINY)
    t = time.time()
    cfg = load_config(SFTConfig, base={**SFT, "model": str(base), "output_dir": str(root / "sft"), "seed": seed,
                                       "datasets": [{"path": str(root / "data" / "selfrag_sft.jsonl"),
                                                     "license": F.LICENSE}]})
    sft = run_sft(cfg)
    sft_seconds = round(time.time() - t, 1)
    summary: dict = {"facts": len(facts), "training_records": len(records), "heldout_questions": len(heldout),
                     "sft_seconds": sft_seconds, "sft_loss": sft.metrics.get("loss")}
    fact_accuracy = {}
    for mode, key in (("adaptive", "with_retrieval"), ("never", "without_retrieval")):
        t = time.time()
        metrics, results = evaluate(root / "sft", retriever, heldout, mode)
        summary[key] = {**metrics, "seconds": round(time.time() - t, 1)}
        about_facts = [r["correct"] for r in results if r["kind"] != "closed_book"]
        fact_accuracy[key] = round(sum(about_facts) / max(len(about_facts), 1), 4)
        write_text(root / f"answers-{key}.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    w, wo = summary["with_retrieval"], summary["without_retrieval"]
    # accuracy on the questions about facts (single and two-hop); the closed-book controls count apart
    summary.update(accuracy_with_retrieval=fact_accuracy["with_retrieval"],
                   accuracy_without_retrieval=fact_accuracy["without_retrieval"],
                   retrieval_rate_closed_book=w.get("retrieval_rate_closed_book"),
                   citation_precision=w["citation_precision"], seconds=round(time.time() - started, 1))
    write_json(root / "summary.json", summary)
    plot(summary, root / "summary.png")
    print(f"\n{'held-out questions':28}{'with retrieval':>16}{'without':>10}")
    print(f"{'accuracy, facts':28}{summary['accuracy_with_retrieval']:>16.2f}{summary['accuracy_without_retrieval']:>10.2f}")
    for kind in ("single", "two_hop", "closed_book"):
        if f"accuracy_{kind}" in w:
            print(f"{'accuracy, ' + kind:28}{w[f'accuracy_{kind}']:>16.2f}{wo[f'accuracy_{kind}']:>10.2f}")
    for kind in ("single", "two_hop", "closed_book"):
        if f"retrieval_rate_{kind}" in w:
            print(f"{'retrieval rate, ' + kind:28}{w[f'retrieval_rate_{kind}']:>16.2f}")
    print(f"{'citation precision / recall':28}{w['citation_precision'] or 0:>8.2f} / {w['citation_recall'] or 0:.2f}")
    print(f"\n{summary['seconds']} s (SFT {sft_seconds} s); {root / 'summary.json'}, {root / 'summary.png'}")
    return summary
