"""``posttrain tts``: test-time scaling curves, as in s1.

For a task, every budget setting is run: ``max_thinking`` caps (no extension) and ``wait`` counts
(``num_wait`` extensions, no cap). With neither, the one setting is ``sampling``: plain completions
of up to ``max_new_tokens`` tokens, no budget forcing (majority voting for a model that does not
think). ``max_new_tokens`` bounds a ``sampling`` completion and an uncapped thinking segment. Each
setting samples ``max(majority)`` completions per instance (greedy when that is 1, else
temperature ``temperature``); majority@k votes over the extracted answers of the first ``k`` samples
(ties: the earliest answer wins) and is correct when the voted answer's sample is. Reported per
(setting, k): accuracy and the mean number of tokens spent per instance (``k`` samples' worth;
thinking tokens under budget forcing, all generated tokens for ``sampling``). Writes
``results.json``, ``samples.jsonl``, ``results.md`` and ``tts.png`` (accuracy against mean tokens: a
line per k and setting kind, or for ``sampling`` one line through the k values).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

from posttrain.atomic import write_json, write_text
from posttrain.eval import plots
from posttrain.eval.tasks import resolve_tasks
from posttrain.eval.tasks.base import load
from posttrain.inference import budget_forcing
from posttrain.inference.engine import SamplingParams
from posttrain.inference.open import local_engine
from posttrain.util import log


def majority(samples: list[dict], k: int) -> float:
    """1.0 when the most common extracted answer among the first ``k`` samples is a correct one."""
    first = samples[:k]
    answers = [s["extracted"] for s in first if s["extracted"] is not None]
    if not answers:
        return float(first[0]["score"])
    top = Counter(answers).most_common(1)[0][0]
    return float(next(s["score"] for s in first if s["extracted"] == top))


def sweep(model_path: str, task_name: str, output: str | Path, max_thinking: list[int], waits: list[int],
          majorities: list[int], bf: budget_forcing.BudgetForcing, limit: int | None = None, data: str | None = None,
          temperature: float = 0.8, batch_size: int = 16, seed: int = 0, max_new_tokens: int = 256,
          engine: str = "transformers") -> dict:
    (task,) = resolve_tasks([task_name])
    instances = load(task, data, limit)
    engine = local_engine(model_path, engine, batch_size)
    settings = [("max_thinking", m, replace(bf, max_thinking_tokens=m, num_wait=0)) for m in max_thinking]
    settings += [("wait", w, replace(bf, num_wait=w)) for w in waits]
    n = max(majorities)
    sampling = SamplingParams(temperature=temperature if n > 1 else 0.0, n=n, seed=seed,
                              max_new_tokens=max_new_tokens)
    points, rows = [], []
    for kind, value, setting in settings or [("sampling", 0, None)]:
        engine.progress = f"tts {kind} {value}" if setting is not None else "tts sampling"
        if setting is None:
            outs = [budget_forcing.ForcedCompletion(o.text, "", o.text, len(o.token_ids), 0, False, o.prompt_index)
                    for o in engine.generate([i["prompt"] for i in instances], sampling)]
        else:
            outs = budget_forcing.generate(engine, [i["prompt"] for i in instances], setting, sampling)
        per_instance: dict[int, list[dict]] = {}
        for o in outs:
            inst = instances[o.prompt_index]
            scored = task.score(o.text, inst)
            row = {"task": task.name, "setting": kind, "value": value, "id": inst.get("id"), "index": inst["index"],
                   "prompt": inst["prompt"], "output": o.text, "thinking_tokens": o.thinking_tokens, "waits": o.waits,
                   "forced_stop": o.forced_stop, "ground_truth": inst["ground_truth"], **scored}
            per_instance.setdefault(o.prompt_index, []).append(row)
            rows.append(row)
        for k in majorities:
            acc = sum(majority(v, k) for v in per_instance.values()) / len(per_instance)
            tokens = sum(sum(s["thinking_tokens"] for s in v[:k]) for v in per_instance.values()) / len(per_instance)
            points.append({"setting": kind, "value": value, "majority": k, "accuracy": round(acc, 6),
                           "mean_thinking_tokens": round(tokens, 2), "instances": len(per_instance)})
            log(f"tts {task.name} {kind}={value} maj@{k}: accuracy {acc:.4f}, thinking tokens {tokens:.1f}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "samples.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in rows))
    result = {"task": task.name, "points": points, "config": {
        "model": model_path, "max_thinking": max_thinking, "wait": waits, "majority": majorities, "limit": limit,
        "temperature": temperature, "seed": seed, "budget_forcing": vars(bf)}}
    write_json(out / "results.json", result)
    lines = ["| setting | k | accuracy | mean tokens |", "|---|---|---|---|"]
    lines += [f"| {p['setting']}={p['value']} | {p['majority']} | {p['accuracy']:.4f} | {p['mean_thinking_tokens']} |"
              for p in points]
    write_text(out / "results.md", "\n".join(lines) + "\n")
    plot(points, out / "tts.png", task.name)
    return result


def plot(points: list[dict], path: Path, title: str) -> None:
    fig, ax = plots.figure()
    for k in sorted({p["majority"] for p in points}):
        for kind, marker in (("max_thinking", "o"), ("wait", "s")):
            mine = sorted((p for p in points if p["majority"] == k and p["setting"] == kind),
                          key=lambda p: p["mean_thinking_tokens"])
            if mine:
                ax.plot([p["mean_thinking_tokens"] for p in mine], [p["accuracy"] for p in mine], marker=marker,
                        label=f"{kind}, majority@{k}")
    plain = sorted((p for p in points if p["setting"] == "sampling"), key=lambda p: p["majority"])
    if plain:
        ax.plot([p["mean_thinking_tokens"] for p in plain], [p["accuracy"] for p in plain], marker="o",
                label="majority@k, k = " + ", ".join(str(p["majority"]) for p in plain))
    ax.set_xlabel("mean tokens per question (thinking tokens under budget forcing)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    plots.save(fig, path)


def run_tts_stage(config: dict, output: Path, model: str) -> list[dict]:
    """A recipe's ``tts`` stage: ``task``, ``max_thinking``, ``wait``, ``majority``, ``budget_forcing``
    (``BudgetForcing``'s keys) and ``sweep``'s keys; its points."""
    bf = budget_forcing.BudgetForcing(**config.pop("budget_forcing", {}))
    return sweep(model, config.pop("task"), output, config.pop("max_thinking", []), config.pop("wait", []),
                 config.pop("majority", [1]), bf, **config)["points"]
