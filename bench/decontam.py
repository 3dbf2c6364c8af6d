"""Decontamination throughput: posttrain's n-gram index against the straightforward check.

    python bench/decontam.py                      # 100,000 prompts, 8-grams, 2 workers
    python bench/decontam.py --prompts 200000 --workers 1

The evaluation side has the size of the full dev + unseen suites (GSM8K test 1,319, MATH-500 500,
IFEval 541, HumanEval 164, MMLU test 14,042, AlpacaEval 805 = 17,371 items). Offline, only the dev
subsets of MATH-500 (250) and IFEval (271) and all of HumanEval exist, so the other items are
stand-ins drawn from the local files (GSM8K: the first 1,319 train questions; MMLU: GSM8K solutions
and hh-rlhf harmless-base replies; AlpacaEval: harmless-base user turns; MATH-500 and IFEval cycled):
lookups cost per training n-gram, so throughput depends on the training text, and the index size on
the item count and length.

Training prompts: the other GSM8K train questions, hh-rlhf helpful-base user turns and the
self-instruct instructions, cycled to ``--prompts``; every 1,000th is replaced by an evaluation item,
so there is something to find. The alternative is what one writes by hand: the 8-grams of each
prompt as tuples of words looked up in a dict from word tuples to items (one process; ASCII words;
no matching of items shorter than 8 words, so it flags fewer). Every prompt it flags must be flagged
by posttrain too (checked). Memory: what each index holds once built (tracemalloc, a second build).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import time
import tracemalloc

from common import DATA

from posttrain.data.adapters import parse_hh_text
from posttrain.data.decontam import EvalInstance, NgramIndex, check_texts

SUITE = {"gsm8k": 1319, "math500": 500, "ifeval": 541, "humaneval": 164, "mc": 14042, "judge_winrate": 805}


def lines(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(x) for x in f]


def hh_turns(name: str, role: str) -> list[str]:
    """The first ``role`` turn of every hh-rlhf conversation in one file."""
    out = []
    for r in lines(DATA / "hh_rlhf" / name):
        turns = parse_hh_text(r["chosen"], name, "chosen")
        out += [t["content"] for t in turns if t["role"] == role][:1]
    return out


def cycle(items: list[str], n: int) -> list[str]:
    return [items[i % len(items)] for i in range(n)]


def eval_items() -> list[EvalInstance]:
    gsm = lines(DATA / "gsm8k" / "train.jsonl")
    harmless = "harmless-base_test.jsonl.gz"
    texts = {
        "gsm8k": [r["question"] for r in gsm[:1319]],
        "math500": cycle([r["problem"] for r in lines(DATA / "math" / "math500_dev.jsonl")], 500),
        "ifeval": cycle([r["prompt"] for r in lines(DATA / "ifeval" / "ifeval_dev.jsonl")], 541),
        "humaneval": [r["prompt"] for r in lines(DATA / "humaneval" / "HumanEval.jsonl.gz")],
        "mc": cycle([r["answer"] for r in gsm] + hh_turns(harmless, "assistant"), 14042),
        "judge_winrate": hh_turns(harmless, "user")[:805],
    }
    return [EvalInstance(task, i, None, t) for task, items in texts.items() for i, t in enumerate(items)]


def train_prompts(n: int) -> list[str]:
    """Disjoint from the stand-in evaluation texts: the other GSM8K questions, hh-rlhf helpful-base user
    turns, self-instruct instructions."""
    pool = [r["question"] for r in lines(DATA / "gsm8k" / "train.jsonl")[1319:]]
    pool += hh_turns("helpful-base_test.jsonl.gz", "user")
    pool += [r["instruction"] for r in lines(DATA / "self_instruct" / "seed_tasks.jsonl")]
    pool += [r["instruction"] for r in lines(DATA / "self_instruct" / "user_oriented_instructions.jsonl")]
    return cycle(pool, n)


class Straightforward:
    def __init__(self, items: list[EvalInstance], n: int):
        self.n, self.grams, self.sizes = n, {}, []
        for k, item in enumerate(items):
            g = self._grams(item.text)
            for x in g:
                self.grams.setdefault(x, []).append(k)
            self.sizes.append(len(g))

    def _grams(self, text: str) -> set:
        ws = re.sub(r"[^0-9a-z]+", " ", text.lower()).split()
        return {tuple(ws[i:i + self.n]) for i in range(len(ws) - self.n + 1)} or ({tuple(ws)} if ws else set())

    def flagged(self, text: str, threshold: float) -> bool:
        counts: dict[int, int] = {}
        for g in self._grams(text):
            for k in self.grams.get(g, ()):
                counts[k] = counts.get(k, 0) + 1
        return any(c / self.sizes[k] >= threshold for k, c in counts.items())


def traced_mib(build) -> float:
    """Memory the object ``build()`` returns holds (tracemalloc: Python objects and numpy arrays)."""
    tracemalloc.start()
    keep = build()
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del keep
    return size / 2**20


def build_ours(items, n: int) -> NgramIndex:
    index = NgramIndex(n)
    for item in items:
        index.add(item)
    index.filters()
    return index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ngram", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()

    items = eval_items()
    prompts = train_prompts(args.prompts)
    # a few contaminated prompts, so both checks have something to find
    prompts[::1000] = [items[i * 97 % len(items)].text for i in range(len(prompts[::1000]))]

    t = time.perf_counter()
    index = build_ours(items, args.ngram)
    build = time.perf_counter() - t
    mem = traced_mib(lambda: build_ours(items, args.ngram))
    t = time.perf_counter()
    ours = check_texts(index, prompts, args.threshold, workers=args.workers)
    ours_s = time.perf_counter() - t

    t = time.perf_counter()
    plain = Straightforward(items, args.ngram)
    plain_build = time.perf_counter() - t
    plain_mem = traced_mib(lambda: Straightforward(items, args.ngram))
    t = time.perf_counter()
    theirs = [plain.flagged(p, args.threshold) for p in prompts]
    plain_s = time.perf_counter() - t
    missed = sum(f and m is None for m, f in zip(ours, theirs))
    assert missed == 0, f"{missed} prompts flagged by the straightforward check only"

    print(f"evaluation items: {len(items)} ({', '.join(f'{k} {v}' for k, v in SUITE.items())}); "
          f"training prompts: {len(prompts)}; {args.ngram}-grams, threshold {args.threshold}")
    print(f"{'':22}{'index s':>9}{'index MiB':>11}{'check s':>9}{'prompts/s':>12}{'flagged':>9}")
    print(f"{'posttrain (' + str(args.workers) + ' proc)':22}{build:>9.2f}{mem:>11.0f}{ours_s:>9.2f}"
          f"{len(prompts) / ours_s:>12,.0f}{sum(m is not None for m in ours):>9}")
    print(f"{'straightforward':22}{plain_build:>9.2f}{plain_mem:>11.0f}{plain_s:>9.2f}"
          f"{len(prompts) / plain_s:>12,.0f}{sum(theirs):>9}")
    extra = sum(m is not None for m in ours) - sum(theirs)
    print(f"ratio: {plain_s / ours_s:.2f}x prompts/s; posttrain flags {extra} more (items shorter than "
          f"{args.ngram} words found whole), none fewer")


if __name__ == "__main__":
    main()
