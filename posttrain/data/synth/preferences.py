"""Preference data from a pool of models and an LLM judge (Tulu 3's on-policy + off-policy pipeline).

For each prompt, ``per_prompt`` models are drawn (seeded, per prompt) from the pool, and the
on-policy model (the one being improved) is always added; each writes one response. The judge rates
every response 1-5 on four aspects (helpfulness, instruction following, truthfulness, honesty) with
the fixed rubric ``RUBRIC``; ``parse_ratings`` reads a JSON object, or "Aspect: n" lines, and returns
None when any aspect is missing or outside 1-5. A response's rating is the mean of its four. The
chosen response is the best rated (a seeded pick among equals), the rejected one a seeded pick among
the strictly lower rated. Prompts where every rated response ties, or with fewer than two rated
responses, give no pair; both cases and unparseable judgments are counted.
"""

from __future__ import annotations

import json
import random
import re

from posttrain.errors import UserError
from posttrain.inference.engine import SamplingParams

ASPECTS = ("helpfulness", "instruction_following", "truthfulness", "honesty")
RUBRIC = """You are a strict, fair judge of an AI assistant's response. Rate it from 1 (worst) to 5 (best) on each aspect:
- helpfulness: does it address the user's need usefully, clearly and completely?
- instruction_following: does it follow every instruction and constraint in the request?
- truthfulness: is it free of factual errors and made-up content?
- honesty: does it express uncertainty where appropriate and avoid overclaiming?

[User request]
{prompt}

[Assistant response]
{response}

Reply with only a JSON object, for example:
{{"helpfulness": 3, "instruction_following": 4, "truthfulness": 5, "honesty": 4}}"""

_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_LINE = {a: re.compile(a.replace("_", r"[ _-]?") + r"\W{0,4}(\d(?:\.\d+)?)(?:\s*/\s*5)?", re.IGNORECASE) for a in ASPECTS}


def parse_ratings(text: str) -> dict[str, float] | None:
    """The four ratings from a judge's reply, or None (see the module docstring)."""
    for candidate in reversed(_OBJECT.findall(text)):
        try:
            obj = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            norm = {str(k).lower().replace(" ", "_").replace("-", "_"): v for k, v in obj.items()}
            got = {a: norm.get(a) for a in ASPECTS}
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) and 1 <= v <= 5 for v in got.values()):
                return {a: float(v) for a, v in got.items()}
    got = {}
    for a, pattern in _LINE.items():
        found = pattern.findall(text)
        if not found or not 1 <= float(found[-1]) <= 5:
            return None
        got[a] = float(found[-1])
    return got


def conversation_text(messages: list[dict]) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def build_pairs(prompts: list[dict], pool: dict, judge, onpolicy: tuple[str, object] | None = None,
                per_prompt: int | None = None, max_new_tokens: int = 512, temperature: float = 0.7,
                judge_max_tokens: int = 256, seed: int = 0) -> tuple[list[dict], list[dict], dict]:
    """(preference records, every judged response, stats). ``pool``: name -> engine."""
    if not pool and onpolicy is None:
        raise UserError("the pool is empty and there is no on-policy model")
    names = sorted(pool)
    k = len(names) if per_prompt is None else min(per_prompt, len(names))
    chosen_models = [sorted(random.Random(f"{seed}:pool:{i}").sample(names, k)) for i in range(len(prompts))]
    engines = dict(pool)
    if onpolicy is not None:
        engines[onpolicy[0]] = onpolicy[1]
        chosen_models = [m + [onpolicy[0]] for m in chosen_models]
    responses: dict[tuple[int, str], str] = {}
    for name, engine in engines.items():
        mine = [i for i, ms in enumerate(chosen_models) if name in ms]
        if not mine:
            continue
        outs = engine.generate([prompts[i]["messages"] for i in mine],
                               SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed))
        for o in outs:
            responses[mine[o.prompt_index], name] = o.text.strip()
    keys = [(i, m) for i, ms in enumerate(chosen_models) for m in ms]
    asks = [[{"role": "user", "content": RUBRIC.format(prompt=conversation_text(prompts[i]["messages"]),
                                                        response=responses[i, m])}] for i, m in keys]
    verdicts = judge.generate(asks, SamplingParams(max_new_tokens=judge_max_tokens, temperature=0.0, seed=seed))
    judged, rated = [], {}
    stats = {"prompts": len(prompts), "responses": len(keys), "unparseable": 0, "ties": 0, "too_few_rated": 0,
             "empty_responses": 0, "pairs": 0}
    for (i, m), v in zip(keys, sorted(verdicts, key=lambda o: o.prompt_index)):
        ratings = parse_ratings(v.text) if responses[i, m] else None
        stats["empty_responses"] += int(not responses[i, m])
        stats["unparseable"] += int(ratings is None and bool(responses[i, m]))
        mean = round(sum(ratings.values()) / len(ratings), 4) if ratings else None
        judged.append({"prompt_index": i, "model": m, "response": responses[i, m], "judgment": v.text,
                       "ratings": ratings, "rating": mean})
        if mean is not None:
            rated.setdefault(i, []).append((m, mean))
    pairs = []
    for i, p in enumerate(prompts):
        cands = rated.get(i, [])
        if len(cands) < 2:
            stats["too_few_rated"] += 1
            continue
        rng = random.Random(f"{seed}:pair:{i}")
        best = max(r for _, r in cands)
        lower = [c for c in cands if c[1] < best]
        if not lower:
            stats["ties"] += 1
            continue
        chosen = rng.choice([c for c in cands if c[1] == best])
        rejected = rng.choice(lower)
        pairs.append({"prompt": p["messages"], "chosen": [{"role": "assistant", "content": responses[i, chosen[0]]}],
                      "rejected": [{"role": "assistant", "content": responses[i, rejected[0]]}],
                      "chosen_model": chosen[0], "rejected_model": rejected[0], "chosen_rating": chosen[1],
                      "rejected_rating": rejected[1], "source": p.get("source"),
                      **({"id": p["id"]} if "id" in p else {})})
    stats["pairs"] = len(pairs)
    return pairs, judged, stats


def load_pool(path: str) -> tuple[dict[str, str], int | None]:
    """``pool.yaml``: ``models: [{name, engine}]`` (engine = a local model or openai:<model>@<url>),
    optional ``per_prompt`` (how many pool models answer each prompt; default all)."""
    from posttrain.config_io import read_yaml

    doc = read_yaml(path)
    models = doc.get("models")
    if not isinstance(models, list) or not models:
        raise UserError(f"{path}: expected 'models:', a list of {{name, engine}}")
    pool = {}
    for j, m in enumerate(models):
        if not isinstance(m, dict) or not m.get("name") or not m.get("engine"):
            raise UserError(f"{path}: models[{j}]: fields 'name' and 'engine' are required")
        if m["name"] in pool:
            raise UserError(f"{path}: models[{j}]: duplicate name {m['name']!r}")
        pool[m["name"]] = str(m["engine"])
    per = doc.get("per_prompt")
    if per is not None and (not isinstance(per, int) or per < 1):
        raise UserError(f"{path}: 'per_prompt' must be a positive integer")
    return pool, per
