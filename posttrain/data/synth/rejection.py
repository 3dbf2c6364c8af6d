"""Rejection sampling: verified responses as SFT data (Tulu 3's verified IF/math SFT data; RFT, STaR).

For each verifiable prompt (``messages``, ``ground_truth``, ``verifier``) the engine draws ``samples``
responses; each is scored by the prompt's verifier (``score in [0, 1]``; IFEval's is the share of its
constraints followed). A response is kept when it finished (not cut by ``max_new_tokens``) and scores
at least ``min_score``; a prompt keeps at most ``per_prompt`` of them, the highest scores first (the
earliest sample on ties), each an SFT record ``{"messages": prompt + [assistant turn], "score", ...}``.
The report gives, per verifier, the prompts with a kept response and the mean score of all samples.
"""

from __future__ import annotations

from collections import defaultdict

from posttrain.errors import UserError
from posttrain.inference.engine import SamplingParams
from posttrain.rewards import get_verifier


def rejection_sample(engine, prompts: list[dict], samples: int = 4, temperature: float = 0.7,
                     max_new_tokens: int = 512, seed: int = 0, min_score: float = 1.0,
                     per_prompt: int = 1) -> tuple[list[dict], dict]:
    if samples < 1 or per_prompt < 1 or not 0 < min_score <= 1:
        raise UserError(f"rejection sampling: need samples >= 1, per_prompt >= 1 and 0 < min_score <= 1 "
                        f"(got {samples}, {per_prompt}, {min_score})")
    for i, p in enumerate(prompts):
        if p.get("ground_truth") is None or not p.get("verifier"):
            raise UserError(f"prompt {i} ({p.get('source', '?')}): needs 'ground_truth' and a verifier to be checked")
        get_verifier(p["verifier"])  # unknown names fail before any sampling
    outs = engine.generate([p["messages"] for p in prompts],
                           SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=samples, seed=seed))
    scored: dict[int, list[tuple[float, int, object]]] = defaultdict(list)
    for k, o in enumerate(outs):
        p = prompts[o.prompt_index]
        scored[o.prompt_index].append((get_verifier(p["verifier"])(o.text, p["ground_truth"]), k, o))
    records = []
    stats: dict = {"prompts": len(prompts), "samples": len(outs), "unfinished": 0, "kept_prompts": 0, "records": 0,
                   "by_verifier": {}}
    for i, p in enumerate(prompts):
        mine = scored[i]
        stats["unfinished"] += sum(o.finish_reason != "stop" for _, _, o in mine)
        good = sorted([(s, k, o) for s, k, o in mine if s >= min_score and o.finish_reason == "stop" and o.text.strip()],
                      key=lambda t: (-t[0], t[1]))[:per_prompt]
        v = stats["by_verifier"].setdefault(p["verifier"], {"prompts": 0, "kept_prompts": 0, "score_sum": 0.0, "samples": 0})
        v["prompts"] += 1
        v["kept_prompts"] += bool(good)
        v["score_sum"] += sum(s for s, _, _ in mine)
        v["samples"] += len(mine)
        stats["kept_prompts"] += bool(good)
        extras = {key: p[key] for key in ("id", "source", "license") if key in p}
        for s, _, o in good:
            records.append({"messages": p["messages"] + [{"role": "assistant", "content": o.text}], "score": s,
                            "verifier": p["verifier"], "ground_truth": p["ground_truth"], **extras})
    for v in stats["by_verifier"].values():
        v["mean_score"] = round(v.pop("score_sum") / max(v["samples"], 1), 4)
    stats["records"] = len(records)
    return records, stats
