"""Self-instruct (Wang et al. 2023): bootstrap new instructions from a few seed tasks.

Each round asks the engine ``batch`` times to continue a numbered list of 8 instructions (6 drawn
from the seed tasks, 2 from the instructions generated so far when there are any; seeded draws),
and reads the new numbered items it writes. A candidate is kept when it has 3 to 150 words, does not
ask for what a text model cannot do (images, pictures, graphs, files, maps, drawing, plotting, going
somewhere), does not start with punctuation, and its ROUGE-L F-measure against every instruction in
the pool (seeds + kept ones) is below ``max_rouge`` (0.7). Rounds stop at ``n`` new instructions or
after ``max_rounds``. Each kept instruction then gets one instance (an input, possibly empty, and
the output) from the engine; records come out in the seed file's format (``instruction``,
``instances``) plus ``messages`` for SFT, ``generator`` and ``source``.
"""

from __future__ import annotations

import random
import re

from rouge_score import rouge_scorer

from posttrain.errors import UserError
from posttrain.inference.engine import SamplingParams

BLOCKED = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot",
           "go to", "video", "audio", "music", "flowchart", "diagram")
_ITEM = re.compile(r"^\s*(\d+)\s*[.)]\s*(.+?)\s*$")


def few_shot_prompt(instructions: list[str]) -> str:
    body = "\n".join(f"{i}. {text}" for i, text in enumerate(instructions, 1))
    return f"Come up with a series of diverse tasks, one per line:\n{body}\n{len(instructions) + 1}."


def parse_items(text: str, first: int) -> list[str]:
    """Numbered items of a continuation that starts right after "``first``."."""
    lines = (f"{first}." + text).splitlines()
    out = []
    for line in lines:
        m = _ITEM.match(line)
        text = re.sub(r"^(?:\d+\s*[.)]\s*)+", "", m.group(2)).strip() if m else ""  # "9. 1. Task" restarts a list
        if m and int(m.group(1)) >= first and text:
            out.append(text)
    return out


def acceptable(text: str) -> bool:
    words = text.split()
    if not 3 <= len(words) <= 150 or not text[0].isalnum():
        return False
    low = f" {text.lower()} "
    return not any(re.search(rf"\b{re.escape(b)}\b", low) for b in BLOCKED)


class RougeFilter:
    """ROUGE-L (rouge-score's tokenisation) of a candidate against every instruction in the pool."""

    def __init__(self, pool: list[str], max_rouge: float = 0.7):
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self.pool, self.max_rouge = list(pool), max_rouge

    def best(self, text: str) -> float:
        return max((self.scorer.score(p, text)["rougeL"].fmeasure for p in self.pool), default=0.0)

    def add_if_new(self, text: str) -> bool:
        if self.best(text) >= self.max_rouge:
            return False
        self.pool.append(text)
        return True


def parse_instance(text: str) -> dict | None:
    """``Input: ... Output: ...``; the ``Input:`` label may be missing (what precedes ``Output:`` is the
    input); without ``Output:`` the whole reply is the output. None when there is no output."""
    m = re.search(r"Output:", text, re.IGNORECASE)
    before, after = (text[:m.start()], text[m.end():]) if m else ("", text)
    given = re.sub(r"^\s*Input:\s*", "", before, flags=re.IGNORECASE).strip()
    output = after.strip()
    if not output:
        return None
    return {"input": "" if given.lower() in ("", "none", "<noinput>", "n/a") else given, "output": output}


def bootstrap(seed_tasks: list[dict], engine, n: int, generator: str, batch: int = 8, max_rounds: int | None = None,
              max_rouge: float = 0.7, temperature: float = 0.8, max_new_tokens: int = 256,
              seed: int = 0) -> tuple[list[dict], dict]:
    seeds = [t["instruction"] for t in seed_tasks]
    if len(seeds) < 6:
        raise UserError(f"self-instruct needs at least 6 seed tasks, got {len(seeds)}")
    rouge = RougeFilter(seeds, max_rouge)
    new: list[str] = []
    stats = {"rounds": 0, "candidates": 0, "rejected_form": 0, "rejected_rouge": 0}
    max_rounds = max_rounds if max_rounds is not None else 4 * (n // batch + 1)
    while len(new) < n and stats["rounds"] < max_rounds:
        rng = random.Random(f"{seed}:{stats['rounds']}")
        asks = []
        for _ in range(batch):
            shots = rng.sample(seeds, 6) + (rng.sample(new, min(2, len(new))) if new else rng.sample(seeds, 2))
            asks.append([{"role": "user", "content": few_shot_prompt(shots)}])
        outs = engine.generate(asks, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                    seed=seed + stats["rounds"]))
        for o in sorted(outs, key=lambda o: o.prompt_index):
            for cand in parse_items(o.text, 9):
                stats["candidates"] += 1
                if not acceptable(cand):
                    stats["rejected_form"] += 1
                elif not rouge.add_if_new(cand):
                    stats["rejected_rouge"] += 1
                elif len(new) < n:
                    new.append(cand)
        stats["rounds"] += 1
    asks = [[{"role": "user", "content": f"Instruction: {t}\nWrite one example input for this task ('None' if it "
                                         f"needs no input) and the correct output, in this form:\nInput: ...\nOutput: ..."}]
            for t in new]
    outs = sorted(engine.generate(asks, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)),
                  key=lambda o: o.prompt_index) if new else []
    records, no_instance = [], 0
    for i, (text, o) in enumerate(zip(new, outs)):
        inst = parse_instance(o.text)
        if inst is None:
            no_instance += 1
            continue
        user = text + (f"\n\n{inst['input']}" if inst["input"] else "")
        records.append({"id": f"self_instruct_{i}", "instruction": text, "instances": [inst],
                        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": inst["output"]}],
                        "generator": generator, "source": "self-instruct"})
    stats.update({"instructions": len(new), "without_instance": no_instance, "records": len(records)})
    return records, stats
