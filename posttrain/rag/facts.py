"""``rag_facts``: a knowledge base no pretrained model can know, questions about it, and the metrics
of a retrieval-augmented answer.

The generated base has made-up people, cities, companies and countries, related by fixed relations
(a person was born in a city and works for a company; a city lies in a country; a company is based
in a city ...). Each entity gets one document (title: its name; text: its fact sentences), the corpus
of the datastore. Questions come in three kinds:

- ``single``: one fact (``Where was Toravi Quell born?``);
- ``two_hop``: two chained facts (``In which country was Toravi Quell born?``: born in a city, the
  city lies in a country), whose supporting sentences are in two documents;
- ``closed_book``: arithmetic (``What is 17 + 25?``) that needs no retrieval.

A user's own facts (JSONL of ``{"subject", "relation", "object", "text"}``) replace the generated
ones; their questions are ``What is the <relation> of <subject>?`` and, where a fact's object is
another fact's subject, the two-hop ``What is the <relation 2> of the <relation 1> of <subject>?``.

Scores: an answer is correct when the normalised expected answer occurs in the normalised output as
whole words. Citation precision is the share of cited passages that hold one of the question's
supporting sentences; citation recall the share of supporting sentences held by some cited passage.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict

from posttrain.errors import UserError

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
INSTRUMENTS = ["the oboe", "the cello", "the harp", "the bassoon", "the lute", "the zither", "the viola", "the sitar"]
PRODUCTS = ["lanterns", "compasses", "kites", "barometers", "telescopes", "looms", "sundials", "bicycles"]

# relation: (subject kind, object kind or a value list, sentence, question)
RELATIONS = {
    "born_in": ("person", "city", "{s} was born in {o}.", "Where was {s} born?"),
    "works_for": ("person", "company", "{s} works for {o}.", "Which company does {s} work for?"),
    "plays": ("person", INSTRUMENTS, "{s} plays {o}.", "Which instrument does {s} play?"),
    "country": ("city", "country", "{s} is a city in {o}.", "In which country is {s}?"),
    "river": ("city", "river", "The river {o} flows through {s}.", "Which river flows through {s}?"),
    "based_in": ("company", "city", "{s} is based in {o}.", "In which city is {s} based?"),
    "makes": ("company", PRODUCTS, "{s} makes {o}.", "What does {s} make?"),
}
TWO_HOP = {("born_in", "country"): "In which country was {s} born?",
           ("based_in", "country"): "In which country is {s} based?",
           ("works_for", "based_in"): "In which city is the company {s} works for based?"}
LICENSE = "generated (no third-party content); CC0-1.0"


def _name(rng: random.Random, used: set[str], syllables: int) -> str:
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()
        if name not in used:
            used.add(name)
            return name


def generate_facts(n_people: int = 60, seed: int = 0) -> list[dict]:
    """Facts ``{"subject", "relation", "object", "text"}`` about ``n_people`` people and the cities,
    companies, countries and rivers they relate to (a quarter as many cities and companies)."""
    rng = random.Random(seed)
    used: set[str] = set()
    kinds = {"country": [_name(rng, used, 3)[:-1] + "ia" for _ in range(max(3, n_people // 6))],
             "river": [_name(rng, used, 2) for _ in range(max(2, n_people // 4))],
             "city": [_name(rng, used, 3) for _ in range(max(2, n_people // 4))],
             "company": [_name(rng, used, 2) + " " + rng.choice(["Works", "Guild", "Company", "Foundry"])
                         for _ in range(max(2, n_people // 4))],
             "person": [f"{_name(rng, used, 2)} {_name(rng, used, 3)}" for _ in range(n_people)]}
    facts = []
    for relation, (subject_kind, objects, sentence, _) in RELATIONS.items():
        for s in kinds[subject_kind]:
            o = rng.choice(objects if isinstance(objects, list) else kinds[objects])
            facts.append({"subject": s, "relation": relation, "object": o, "text": sentence.format(s=s, o=o)})
    return facts


def read_facts(path: str) -> list[dict]:
    """A user's facts file: every record needs non-empty ``subject``, ``relation``, ``object``, ``text``."""
    from posttrain.data.io import read_records

    facts = []
    for raw, where in read_records(path):
        for key in ("subject", "relation", "object", "text"):
            if not isinstance(raw.get(key), str) or not raw[key].strip():
                raise UserError(f"{where}: field '{key}' must be a non-empty string")
        facts.append({k: raw[k].strip() for k in ("subject", "relation", "object", "text")})
    if not facts:
        raise UserError(f"{path}: no facts")
    return facts


def documents(facts: list[dict], seed: int = 0) -> list[dict]:
    """One document per subject: ``{"id", "title", "text"}``, its fact sentences in a seeded order."""
    rng = random.Random(seed)
    by_subject: dict[str, list[str]] = defaultdict(list)
    for f in facts:
        by_subject[f["subject"]].append(f["text"])
    out = []
    for i, (subject, sentences) in enumerate(sorted(by_subject.items())):
        rng.shuffle(sentences)
        out.append({"id": f"entity-{i}", "title": subject, "text": " ".join(sentences)})
    return out


def questions(facts: list[dict], n_closed_book: int = 20, seed: int = 0) -> list[dict]:
    """Every single-hop and two-hop question the facts allow, plus ``n_closed_book`` arithmetic
    controls: ``{"id", "question", "answer", "kind", "support": [fact texts], "entity"}``."""
    rng = random.Random(seed)
    out = []
    index = {(f["subject"], f["relation"]): f for f in facts}
    for f in facts:
        template = RELATIONS[f["relation"]][3] if f["relation"] in RELATIONS else None
        q = template.format(s=f["subject"]) if template else f"What is the {_words(f['relation'])} of {f['subject']}?"
        out.append({"question": q, "answer": f["object"], "kind": "single", "support": [f["text"]],
                    "entity": f["subject"]})
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for f in facts:
        by_subject[f["subject"]].append(f)
    for f in facts:
        if f["relation"] in RELATIONS:
            chained = [(t, index.get((f["object"], r2))) for (r1, r2), t in TWO_HOP.items() if r1 == f["relation"]]
        else:
            chained = [(f"What is the {_words(g['relation'])} of the {_words(f['relation'])} of {{s}}?", g)
                       for g in by_subject[f["object"]]]
        for template, g in chained:
            if g is not None:
                out.append({"question": template.format(s=f["subject"]), "answer": g["object"], "kind": "two_hop",
                            "support": [f["text"], g["text"]], "entity": f["subject"]})
    for _ in range(n_closed_book):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        out.append({"question": f"What is {a} + {b}?", "answer": str(a + b), "kind": "closed_book", "support": [],
                    "entity": None})
    return [{"id": i, **q} for i, q in enumerate(out)]


def split_by_entity(qs: list[dict], heldout_share: float = 0.25, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Questions split so that no held-out question is about an entity a training question is about;
    closed-book controls split by the same share."""
    rng = random.Random(seed)
    entities = sorted({q["entity"] for q in qs if q["entity"] is not None})
    rng.shuffle(entities)
    held = set(entities[:max(1, round(len(entities) * heldout_share))])
    closed = [q for q in qs if q["entity"] is None]
    n_closed = round(len(closed) * heldout_share)
    train = [q for q in qs if q["entity"] is not None and q["entity"] not in held] + closed[n_closed:]
    heldout = [q for q in qs if q["entity"] in held] + closed[:n_closed]
    return train, heldout


def _words(relation: str) -> str:
    return relation.replace("_", " ")


def normalize(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def correct(output: str, answer: str) -> bool:
    return f" {normalize(answer)} " in f" {normalize(output)} "


def holds(passage_text: str, sentence: str) -> bool:
    return normalize(sentence) in normalize(passage_text)


def citation_scores(cited: list[str], support: list[str]) -> tuple[float | None, float | None]:
    """``(precision, recall)`` of the cited passages' texts against the supporting sentences; None
    where undefined (nothing cited; nothing to support)."""
    precision = sum(any(holds(p, s) for s in support) for p in cited) / len(cited) if cited else None
    recall = sum(any(holds(p, s) for p in cited) for s in support) / len(support) if support else None
    return precision, recall


def score(result: dict, question: dict) -> dict:
    """One answer of ``SelfRAG`` or ``OpenScholar`` (``{"text", "passages"}`` + ``"cited"`` numbers
    or ``"retrieved"``) scored against its question: ``{"kind", "correct", "retrieved", "precision",
    "recall"}``. OpenScholar's cited passages are those its text cites; Self-RAG's, those it read."""
    cited = [result["passages"][n - 1] for n in result["cited"]] if "cited" in result else result["passages"]
    precision, recall = citation_scores([p["text"] for p in cited], question.get("support", []))
    return {"kind": question.get("kind", "single"), "correct": correct(result["text"], question["answer"]),
            "retrieved": bool(result.get("retrieved", result["passages"])), "precision": precision, "recall": recall}


def metrics(results: list[dict]) -> dict:
    """Aggregate per-question results ``{"kind", "correct", "retrieved", "precision", "recall"}``:
    accuracy overall and per kind, retrieval rate per kind, mean citation precision and recall."""
    out: dict = {"n": len(results), "accuracy": _mean([r["correct"] for r in results])}
    for kind in ("single", "two_hop", "closed_book"):
        rs = [r for r in results if r["kind"] == kind]
        if rs:
            out[f"accuracy_{kind}"] = _mean([r["correct"] for r in rs])
            out[f"retrieval_rate_{kind}"] = _mean([r["retrieved"] for r in rs])
    for key in ("precision", "recall"):
        values = [r[key] for r in results if r[key] is not None]
        out[f"citation_{key}"] = _mean(values) if values else None
    return out


def _mean(values: list) -> float:
    return round(sum(float(v) for v in values) / len(values), 4) if values else 0.0
