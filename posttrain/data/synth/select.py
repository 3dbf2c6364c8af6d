"""s1's data selection: quality, then difficulty, then diversity (Muennighoff et al. 2025, section 2).

1. Quality: drop records missing a question, a reasoning trace or an answer; records referring to
   images (``[asy]``, ``<img``, markdown images, image file names, "the figure/diagram shown");
   records with formatting artifacts (ASCII-art lines of ten or more repeated symbols, runs of three
   or more consecutive blank lines, an odd number of unescaped ``$`` in a question that uses LaTeX
   commands: prices like "$5" alone are fine).
2. Difficulty: each reference model answers every question once (greedy); a question is dropped
   when any reference model's answer passes the record's verifier against its answer.
3. Diversity: every record has a domain (from a field, or a label an LLM picks from a list); until
   ``size`` records are chosen: pick a domain uniformly at random among those with records left,
   then one of its records with probability proportional to ``2^-rank``, rank 0 being the longest
   reasoning trace (in words); remove it from the pool.

Each stage's removals are counted; the selection keeps every input field.
"""

from __future__ import annotations

import random
import re
from collections import Counter

from posttrain.data.synth.prompts import user_text
from posttrain.errors import UserError
from posttrain.inference.engine import SamplingParams
from posttrain.rewards import get_verifier

IMAGE = re.compile(r"\[asy\]|<img\b|!\[[^\]]*\]\(|\b\S+\.(?:png|jpe?g|gif|svg|bmp)\b|"
                   r"\b(?:in|see|shown in) the (?:figure|diagram|image|picture|graph) (?:below|above|shown)\b|"
                   r"\bthe (?:figure|diagram|image|picture) (?:below|above)\b", re.IGNORECASE)
ASCII_ART = re.compile(r"([^\w\s$\\{}()])\1{9,}")
BLANK_RUN = re.compile(r"\n\s*\n\s*\n\s*\n")
DEFAULT_DOMAINS = ("algebra", "geometry", "number theory", "combinatorics", "probability and statistics", "calculus",
                   "arithmetic", "physics", "chemistry", "biology", "computer science", "other")


def question_of(rec: dict) -> str | None:
    if isinstance(rec.get("messages"), list) and rec["messages"]:
        return user_text(rec["messages"])
    return next((rec[k] for k in ("question", "problem", "prompt") if isinstance(rec.get(k), str)), None)


def trace_of(rec: dict) -> str | None:
    for key in ("trace", "reasoning", "thinking", "solution"):
        if isinstance(rec.get(key), str) and rec[key].strip():
            return rec[key]
    if isinstance(rec.get("messages"), list) and rec["messages"] and rec["messages"][-1].get("role") == "assistant":
        return rec["messages"][-1].get("content")
    return None


def answer_of(rec: dict):
    return rec.get("ground_truth", rec.get("answer"))


def quality_problem(rec: dict) -> str | None:
    """Why a record fails the quality filter, or None."""
    q, t = question_of(rec), trace_of(rec)
    if not q or not q.strip():
        return "missing question"
    if not t:
        return "missing trace"
    if answer_of(rec) in (None, ""):
        return "missing answer"
    text = q + "\n" + t
    if IMAGE.search(text):
        return "image reference"
    unbalanced_math = "\\" in q and len(re.findall(r"(?<!\\)\$", q)) % 2
    if ASCII_ART.search(text) or BLANK_RUN.search(text) or unbalanced_math:
        return "formatting artifact"
    return None


def too_easy(records: list[dict], engines: dict, max_new_tokens: int = 1024) -> dict[str, list[bool]]:
    """Per reference model, whether it answers each record correctly (greedy, the record's verifier)."""
    out = {}
    for name, engine in engines.items():
        outs = sorted(engine.generate([[{"role": "user", "content": question_of(r)}] for r in records],
                                      SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)),
                      key=lambda o: o.prompt_index)
        out[name] = [get_verifier(r.get("verifier", "math"))(o.text, answer_of(r)) == 1.0 for r, o in zip(records, outs)]
    return out


def label_domains(records: list[dict], engine, domains: tuple[str, ...] = DEFAULT_DOMAINS) -> list[str]:
    """An LLM's pick from ``domains`` for each question (an answer that names none becomes "other")."""
    listing = "\n".join(f"- {d}" for d in domains)
    asks = [[{"role": "user", "content": f"Which one of these domains does the question belong to?\n{listing}\n\n"
                                         f"Question: {question_of(r)}\n\nReply with the domain name only."}]
            for r in records]
    outs = sorted(engine.generate(asks, SamplingParams(max_new_tokens=16, temperature=0.0)), key=lambda o: o.prompt_index)
    labels = []
    for o in outs:
        said = o.text.strip().lower()
        labels.append(next((d for d in sorted(domains, key=len, reverse=True) if d in said), "other"))
    return labels


def diverse_sample(records: list[dict], domains: list[str], size: int, seed: int = 0) -> list[int]:
    """Indices chosen by s1's domain-uniform, length-preferring sampling (see the module docstring)."""
    rng = random.Random(seed)
    pools: dict[str, list[int]] = {}
    for i, d in enumerate(domains):
        pools.setdefault(d, []).append(i)
    for d in pools:  # longest trace first; index breaks ties
        pools[d].sort(key=lambda i: (-len(trace_of(records[i]).split()), i))
    chosen = []
    while len(chosen) < size and pools:
        d = rng.choice(sorted(pools))
        pool = pools[d]
        weights = [2.0 ** -r for r in range(len(pool))]
        j = rng.choices(range(len(pool)), weights=weights)[0]
        chosen.append(pool.pop(j))
        if not pool:
            del pools[d]
    return chosen


def select(records: list[dict], size: int, difficulty: dict | None = None, domain_field: str | None = None,
           domain_engine=None, domains: tuple[str, ...] = DEFAULT_DOMAINS, seed: int = 0,
           max_new_tokens: int = 1024) -> tuple[list[dict], dict]:
    """(selected records, report): quality -> difficulty (``difficulty``: name -> engine) -> diversity."""
    if size < 1:
        raise UserError(f"--size must be >= 1, got {size}")
    report: dict = {"input": len(records), "quality": {}, "difficulty": {}, "diversity": {}}
    kept = []
    for rec in records:
        why = quality_problem(rec)
        if why is None:
            kept.append(rec)
        else:
            report["quality"][why] = report["quality"].get(why, 0) + 1
    report["after_quality"] = len(kept)
    if difficulty and kept:
        solved = too_easy(kept, difficulty, max_new_tokens)
        report["difficulty"] = {f"solved by {name}": sum(v) for name, v in solved.items()}
        kept = [r for j, r in enumerate(kept) if not any(v[j] for v in solved.values())]
    report["after_difficulty"] = len(kept)
    if domain_field:
        missing = [j for j, r in enumerate(kept) if not isinstance(r.get(domain_field), str)]
        if missing:
            raise UserError(f"record {missing[0]} (after filtering) has no string field {domain_field!r} for its domain")
        labels = [r[domain_field] for r in kept]
    elif domain_engine is not None:
        labels = label_domains(kept, domain_engine, domains)
        kept = [{**r, "domain": d} for r, d in zip(kept, labels)]
    else:
        labels = ["all"] * len(kept)
    picked = diverse_sample(kept, labels, size, seed)
    report["diversity"] = {"domains": len(set(labels)),
                           "per_domain_selected": dict(sorted(Counter(labels[i] for i in picked).items()))}
    report["selected"] = len(picked)
    return [kept[i] for i in picked], report

