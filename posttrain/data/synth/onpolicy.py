"""On-policy preference pairs from verifiable prompts (as Tulu 3 used on-policy data): sample the
model ``samples`` times per prompt, check each completion with the prompt's verifier, and pair a
correct completion (chosen) with a wrong one (rejected), both drawn with a seeded RNG among distinct
texts. Prompts whose samples are all right or all wrong give no pair and are counted."""

from __future__ import annotations

import random

from posttrain.inference.engine import SamplingParams
from posttrain.inference.open import local_engine
from posttrain.rewards import get_verifier


def onpolicy_pairs(model_dir: str, records: list[dict], samples: int = 8, temperature: float = 1.0,
                   max_new_tokens: int = 128, seed: int = 0, batch_size: int = 64,
                   engine: str = "transformers") -> tuple[list[dict], dict]:
    engine = local_engine(model_dir, engine, batch_size)
    engine.progress = "onpolicy pairs"
    outs = engine.generate([r["messages"] for r in records],
                           SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=samples, seed=seed))
    by_prompt: dict[int, list] = {}
    for o in outs:
        by_prompt.setdefault(o.prompt_index, []).append(o)
    pairs, stats = [], {"prompts": len(records), "pairs": 0, "all_correct": 0, "all_wrong": 0, "samples": samples}
    for i, rec in enumerate(records):
        verify = get_verifier(rec["verifier"])
        texts = [o.text for o in by_prompt[i] if o.finish_reason == "stop" and o.text.strip()]
        good = sorted({t for t in texts if verify(t, rec["ground_truth"]) == 1.0})
        bad = sorted({t for t in texts if verify(t, rec["ground_truth"]) < 1.0})
        if not bad:
            stats["all_correct" if good else "all_wrong"] += 1
            continue
        if not good:
            stats["all_wrong"] += 1
            continue
        rng = random.Random(f"{seed}:{i}")
        pairs.append({"prompt": rec["messages"], "chosen": [{"role": "assistant", "content": rng.choice(good)}],
                      "rejected": [{"role": "assistant", "content": rng.choice(bad)}],
                      "source": f"onpolicy:{model_dir}", "license": rec.get("license", "unknown")})
    stats["pairs"] = len(pairs)
    return pairs, stats
