"""Decoding speed: posttrain's engine (and the vLLM engine) against plain ``model.generate``, and the
memory-bandwidth limit.

    python bench/generate.py                       # tiny model and SmolLM2-135M-Instruct
    python bench/generate.py --models smollm2 --new-tokens 64 --rounds 3
    python bench/generate.py --models smollm2 --batch-size 8,64 --vllm   # with VLLMEngine rows (docs/engines.md)

Both decode the same batch of GSM8K questions (rendered with the chat template, left-padded),
greedy, fp32, ``--new-tokens`` new tokens, batch ``--batch``; the engine's tokens must equal
``generate``'s (checked); vLLM's greedy tokens are compared with ``generate``'s and the share of equal
completions is printed (float32 kernels differ: near-ties may flip). vLLM's engine start is timed
apart and not in its tokens/s; its rounds run after the others (a vLLM engine in the process slows
plain torch down here). Tokens/s counts generated tokens (prefill included in the time). The
bandwidth limit is ``batch / (weight bytes / read rate)``: each decode step reads every weight once,
and the read rate is the best of five timings of summing a float32 tensor of that size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import DATA, quiet, tiny_model


def questions(n: int) -> list[list[dict]]:
    with open(DATA / "gsm8k" / "train.jsonl") as f:
        return [[{"role": "user", "content": json.loads(line)["question"]}] for line, _ in zip(f, range(n))]


def read_rate(num_bytes: int) -> float:
    x = torch.ones(num_bytes // 4)
    x.sum()
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = max(best, num_bytes / (time.perf_counter() - t))
    return best


def run(name: str, path: str, batch: int, new_tokens: int, rounds: int) -> tuple[dict, list[list[int]]]:
    from posttrain.data import chat
    from posttrain.inference.engine import SamplingParams, TransformersEngine
    from posttrain.models import load_model, load_tokenizer

    model, tok = load_model(path).eval(), load_tokenizer(path)
    prompts = questions(batch)
    engine = TransformersEngine(model, tok, batch_size=batch)
    ids = [chat.prompt_ids(tok, p) for p in prompts]
    width = max(map(len, ids))
    inp = torch.full((batch, width), engine.pad_id)
    att = torch.zeros((batch, width), dtype=torch.long)
    for r, x in enumerate(ids):
        inp[r, width - len(x):], att[r, width - len(x):] = torch.tensor(x), 1
    ours, theirs = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens))
        ours.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t))
        t = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(input_ids=inp, attention_mask=att, max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=engine.stop_ids, pad_token_id=engine.pad_id)
        seconds = time.perf_counter() - t
        new = gen[:, width:].tolist()
        refs = [row[:next((j + 1 for j, x in enumerate(row) if x in engine.stop_ids), len(row))] for row in new]
        theirs.append(sum(map(len, refs)) / seconds)
        assert [o.token_ids for o in outs] == refs, "engine and generate disagree"
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    limit = batch * read_rate(weight_bytes) / weight_bytes
    r = {"model": name, "batch": batch, "new_tokens": new_tokens, "engine_tok_s": round(statistics.median(ours), 1),
         "generate_tok_s": round(statistics.median(theirs), 1), "bandwidth_limit_tok_s": round(limit, 1),
         "weights_mib": round(weight_bytes / 2**20, 1)}
    r["ratio"] = round(r["engine_tok_s"] / r["generate_tok_s"], 2)
    r["share_of_limit"] = round(r["engine_tok_s"] / limit, 3)
    return r, refs


def run_vllm(path: str, runs: list[tuple[dict, list[list[int]]]], new_tokens: int, rounds: int) -> None:
    """VLLMEngine rows, added to the results of ``run``: timed after the others, since a vLLM engine in
    the process slows plain torch down here (~20% for our engine, ~10% for ``generate``)."""
    from posttrain.inference.engine import SamplingParams
    from posttrain.inference.vllm_engine import VLLMEngine

    t = time.perf_counter()
    vllm = VLLMEngine(path, batch_size=max(r["batch"] for r, _ in runs))
    for r, refs in runs:
        r["vllm_start_seconds"] = round(time.perf_counter() - t, 1)
        prompts, fast, agree = questions(r["batch"]), [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            outs = vllm.generate(prompts, SamplingParams(max_new_tokens=new_tokens))
            fast.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0))
            agree.append(sum(o.token_ids == ref for o, ref in zip(outs, refs)) / len(refs))
        r["vllm_tok_s"] = round(statistics.median(fast), 1)
        r["vllm_ratio"] = round(r["vllm_tok_s"] / r["generate_tok_s"], 2)
        r["vllm_greedy_equal"] = min(agree)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument("--batch-size", default="8", help="comma-separated batch sizes, e.g. 8,64")
    p.add_argument("--vllm", action="store_true", help="also VLLMEngine (the optional extra), started once per model")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    quiet()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "tiny":
                texts = [q[0]["content"] for q in questions(400)]
                path = tiny_model(Path(tmp) / "tiny", texts)
            else:
                from posttrain.models import resolve

                path = resolve("smollm2-135m-instruct")
            runs = [run(name, path, int(b), args.new_tokens, args.rounds) for b in args.batch_size.split(",")]
            if args.vllm:
                run_vllm(path, runs, args.new_tokens, args.rounds)
            for r, _ in runs:
                results.append(r)
                print(json.dumps(r), flush=True)
    print("\n| model | batch | engine tok/s | generate tok/s | ratio | bandwidth limit tok/s | engine / limit |"
          + (" vLLM tok/s | vLLM / generate | vLLM greedy = generate |" if args.vllm else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|---|" if args.vllm else ""))
    for r in results:
        print(f"| {r['model']} | {r['batch']} | {r['engine_tok_s']} | {r['generate_tok_s']} | {r['ratio']}x | "
              f"{r['bandwidth_limit_tok_s']} | {r['share_of_limit']:.0%} |"
              + (f" {r['vllm_tok_s']} | {r['vllm_ratio']}x | {r['vllm_greedy_equal']:.0%} |" if args.vllm else ""))


if __name__ == "__main__":
    main()
