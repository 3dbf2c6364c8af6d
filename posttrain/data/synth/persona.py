"""Persona-driven prompt synthesis (Tulu 3 after Chan et al. 2024, "Scaling synthetic data creation
with 1,000,000,000 personas").

One persona fills one template of the chosen skill, and the engine writes a new prompt from it:

- ``math``: a hard math word problem the persona would meet (a verifiable prompt once solved and
  filtered by self-consistency, ``posttrain data solve`` then ``selfconsistency``);
- ``code``: a self-contained Python programming problem the persona would need;
- ``ifeval``: a request the persona would make, followed by 1-3 compatible verifiable constraints
  (posttrain.data.synth.constraints, drawn before the request exists, so none that need its words);
  the record is a ready RLVR prompt whose ground truth is IFEval's ``instruction_id_list`` +
  ``kwargs``, checked by the ``ifeval`` verifier.

Near-duplicates are removed with MinHash (``datasketch``, 128 permutations, word 3-gram shingles,
LSH at Jaccard ``dedup_threshold``): a prompt is dropped when the LSH finds an earlier kept one.
Every record carries ``persona``, ``template``, ``generator`` and ``generator_license``.
"""

from __future__ import annotations

import random
import re

from datasketch import MinHash, MinHashLSH

from posttrain.data.synth.constraints import constrain, draw
from posttrain.errors import UserError
from posttrain.inference.engine import SamplingParams

TEMPLATES = {
    "math": [
        "Create a challenging math word problem that the following persona could face in their life or work. "
        "The problem must have a single numerical answer. Write only the problem.\n\nPersona: {persona}",
        "Write a multi-step math problem inspired by the following persona, hard enough for a strong high-school "
        "student. Write only the problem, not the solution.\n\nPersona: {persona}",
    ],
    "code": [
        "Write a self-contained Python programming problem that the following persona might need solved. State "
        "the function signature, the input and the expected output. Write only the problem.\n\nPersona: {persona}",
    ],
    "ifeval": [
        "Write one request that the following persona might send to an AI assistant (for example asking for an "
        "essay, a letter, a story, advice or an explanation). Write only the request.\n\nPersona: {persona}",
    ],
}

SKILLS = tuple(TEMPLATES)


def _clean(text: str) -> str:
    """The prompt without a lead-in line ("Here's a possible request:") or label ("Problem:")."""
    text = text.strip()
    first, sep, rest = text.partition("\n")
    if sep and rest.strip() and first.rstrip().endswith(":") and len(first.split()) <= 12:
        text = rest.strip()
    text = re.sub(r"^(?:\*\*)?(?:problem|request|task|question)(?:\*\*)?\s*:\s*", "", text, flags=re.IGNORECASE)
    return text.strip().strip('"').strip()


def minhash(text: str, num_perm: int = 128) -> MinHash:
    words = re.findall(r"\w+", text.lower())
    shingles = {" ".join(words[i:i + 3]) for i in range(max(len(words) - 2, 1))}
    m = MinHash(num_perm=num_perm, seed=1)
    m.update_batch([s.encode() for s in shingles])
    return m


def near_duplicates(texts: list[str], threshold: float = 0.7, num_perm: int = 128) -> list[bool]:
    """Per text, whether an earlier kept text is a near-duplicate (MinHash LSH at Jaccard ``threshold``)."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    out = []
    for i, t in enumerate(texts):
        m = minhash(t, num_perm)
        dup = bool(lsh.query(m))
        if not dup:
            lsh.insert(str(i), m)
        out.append(dup)
    return out


def synthesize(personas: list[str], skill: str, engine, n: int, generator: str, generator_license: str,
               seed: int = 0, temperature: float = 0.8, max_new_tokens: int = 256,
               dedup_threshold: float = 0.7) -> tuple[list[dict], dict]:
    if skill not in TEMPLATES:
        raise UserError(f"--skill must be one of {', '.join(SKILLS)}, got {skill!r}")
    if not personas:
        raise UserError("no personas")
    rng = random.Random(f"{seed}:{skill}")
    plan = []
    for i in range(n):
        persona = personas[i % len(personas)] if n <= len(personas) else rng.choice(personas)
        t = rng.randrange(len(TEMPLATES[skill]))
        plan.append((persona, t, draw(rng, rng.randint(1, 3)) if skill == "ifeval" else None))
    asks = [[{"role": "user", "content": TEMPLATES[skill][t].format(persona=p)}] for p, t, _ in plan]
    outs = sorted(engine.generate(asks, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)),
                  key=lambda o: o.prompt_index)
    texts = [_clean(o.text) for o in outs]
    dups = near_duplicates(texts, dedup_threshold)
    records, stats = [], {"requested": n, "empty": 0, "unfinished": 0, "near_duplicates": 0}
    for i, ((persona, t, cons), text, o, dup) in enumerate(zip(plan, texts, outs, dups)):
        if not text:
            stats["empty"] += 1
            continue
        if o.finish_reason != "stop":
            stats["unfinished"] += 1
            continue
        if dup:
            stats["near_duplicates"] += 1
            continue
        rec = {"id": f"persona_{skill}_{i}", "messages": [{"role": "user", "content": text}], "persona": persona,
               "template": f"{skill}/{t}", "generator": generator, "generator_license": generator_license,
               "source": f"persona/{skill}"}
        if cons is not None:
            rec["messages"][0]["content"], truth = constrain(text, cons)
            rec.update(ground_truth=truth, verifier="ifeval")
        elif skill == "math":
            rec["verifier"] = "math"
        records.append(rec)
    stats["records"] = len(records)
    return records, stats
