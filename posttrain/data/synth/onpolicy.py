"""On-policy preference pairs from verifiable prompts (as Tulu 3 used on-policy data): sample the
model ``samples`` times per prompt, score each finished completion with the prompt's verifier, and
pair a best-scored completion (chosen) with a worst-scored one (rejected), both drawn with a seeded
RNG among distinct texts, when the scores differ by at least ``min_margin``. With a 0/1 verifier
(GSM8K) that is a correct completion against a wrong one; with partial credit (IFEval's share of
constraints followed) it is the most against the least compliant. A completion cut off at
``max_new_tokens`` is left out, or with ``reject_unfinished`` scores 0 and may be the rejected side (a
model that does not yet end its replies then learns that a finished, verified reply beats a runaway
one). Prompts without such a pair are counted: all correct, all wrong (or none finished), or too close."""

from __future__ import annotations

import json
import random
from pathlib import Path

from posttrain.errors import UserError
from posttrain.inference.engine import SamplingParams
from posttrain.inference.open import local_engine
from posttrain.rewards import get_verifier


def pair_completions(records: list[dict], outs: list, source: str, seed: int = 0,
                     min_margin: float = 1.0, reject_unfinished: bool = False) -> tuple[list[dict], dict]:
    """``outs``: the engine's completions (``prompt_index``, ``text``, ``finish_reason``)."""
    if not 0 < min_margin <= 1:
        raise UserError(f"onpolicy pairs: min_margin must be in (0, 1], got {min_margin}")
    by_prompt: dict[int, list] = {}
    for o in outs:
        by_prompt.setdefault(o.prompt_index, []).append(o)
    pairs, stats = [], {"prompts": len(records), "pairs": 0, "all_correct": 0, "all_wrong": 0, "too_close": 0}
    for i, rec in enumerate(records):
        verify = get_verifier(rec["verifier"])
        finished = {o.text for o in by_prompt.get(i, []) if o.finish_reason == "stop" and o.text.strip()}
        scores = {t: verify(t, rec["ground_truth"]) for t in finished}
        if reject_unfinished:
            scores.update({o.text: 0.0 for o in by_prompt.get(i, []) if o.finish_reason != "stop" and o.text.strip()
                           and o.text not in finished})
        texts = sorted(scores)
        if not texts or max(scores.values()) == 0:
            stats["all_wrong"] += 1
            continue
        best, worst = max(scores.values()), min(scores.values())
        if best - worst < min_margin:
            stats["all_correct" if worst == 1.0 else "too_close"] += 1
            continue
        rng = random.Random(f"{seed}:{i}")
        chosen = rng.choice([t for t in texts if scores[t] == best])
        rejected = rng.choice([t for t in texts if scores[t] == worst])
        pairs.append({"prompt": rec["messages"], "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}], "scores": [best, worst],
                      "source": source, "license": rec.get("license", "unknown")})
    stats["pairs"] = len(pairs)
    return pairs, stats


def onpolicy_pairs(model_dir: str, records: list[dict], samples: int = 8, temperature: float = 1.0,
                   max_new_tokens: int = 128, seed: int = 0, batch_size: int = 64,
                   engine: str = "transformers", min_margin: float = 1.0,
                   reject_unfinished: bool = False) -> tuple[list[dict], dict]:
    engine = local_engine(model_dir, engine, batch_size)
    engine.progress = "onpolicy pairs"
    outs = engine.generate([r["messages"] for r in records],
                           SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=samples, seed=seed))
    pairs, stats = pair_completions(records, outs, f"onpolicy:{model_dir}", seed, min_margin, reject_unfinished)
    return pairs, {**stats, "samples": samples}


def run_onpolicy_pairs_stage(config: dict, output: Path, model: str) -> dict:
    """A recipe's ``onpolicy_pairs`` stage: ``prompts`` (a file of verifiable prompts, or sources like
    ``datasets``) and ``onpolicy_pairs``' keys; writes ``pairs.jsonl`` and ``results.json``."""
    from posttrain.atomic import write_json, write_text
    from posttrain.config import DataSource
    from posttrain.config_io import build
    from posttrain.data.mixing import mix

    prompts = config.pop("prompts", None)
    if not prompts:
        raise UserError("onpolicy_pairs stage: config key 'prompts' (a file of verifiable prompts, or a list "
                        "of sources like datasets: {path, split, count}) is required")
    sources = [build(DataSource, {"path": p} if isinstance(p, str) else p, f"onpolicy_pairs stage: prompts[{i}]")
               for i, p in enumerate(prompts if isinstance(prompts, list) else [prompts])]
    for i, src in enumerate(sources):
        src.validate(f"onpolicy_pairs stage: prompts[{i}]")
    records, _ = mix(sources, "verifiable", config.get("seed", 0))
    pairs, stats = onpolicy_pairs(model, records, **config)
    output.mkdir(parents=True, exist_ok=True)
    write_text(output / "pairs.jsonl", "".join(json.dumps(p) + "\n" for p in pairs))
    write_json(output / "results.json", {"results": stats})
    return stats
