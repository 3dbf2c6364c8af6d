"""Evaluation speed: ``posttrain eval`` (transformers engine, vLLM engine) against lm-evaluation-harness
(its ``hf`` backend, and its ``vllm`` backend when it runs) on the same model, items and prompts.

    python bench/eval.py                               # SmolLM2-135M-Instruct, 32 GSM8K items, 128 new tokens
    python bench/eval.py --limit 64 --rounds 2 --harness hf,vllm

Needs ``pip install -e '.[bench]'`` (lm-eval with its dependencies) and, for the vLLM rows, vLLM
(docs/engines.md). The task is posttrain's ``gsm8k`` (zero-shot chain of thought in the chat template)
on the first ``--limit`` questions of ``data/gsm8k/train.jsonl`` (the test split is not in the
repository); lm-eval gets the same prompts as a task written for the run (``--apply_chat_template``,
zero-shot, greedy, at most ``--max-new-tokens`` tokens, stop at the end-of-turn token), so both sides
do the same work: the generated tokens are counted from each side's outputs with the model's tokenizer.
Seconds are wall time of the whole call a user makes (model load and engine start included), and
``generate`` seconds are posttrain's own task timing (``results.json``) for comparison. Runs alternate,
in this one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import DATA, quiet

GSM8K = DATA / "gsm8k" / "train.jsonl"
TASK_YAML = """task: gsm8k_posttrain_prompt
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}{instruction}"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: []
  do_sample: false
  max_gen_toks: {max_new_tokens}
filter_list:
  - name: last_number
    filter:
      - function: regex
        regex_pattern: "####\\\\s*(-?[0-9.,]+)"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_punctuation: true
    regexes_to_ignore: [",", "\\\\$"]
"""


def run_posttrain(model: str, engine: str, out: Path, args) -> dict:
    from posttrain.eval.runner import evaluate

    t = time.perf_counter()
    results = evaluate(model, ["gsm8k"], out, limit=args.limit, data={"gsm8k": str(GSM8K)}, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, engine=engine)
    seconds = time.perf_counter() - t
    outputs = [s["output"] for s in map(json.loads, (out / "samples.jsonl").read_text().splitlines())]
    return {"seconds": seconds, "generate_seconds": results["gsm8k"]["seconds"], "outputs": outputs,
            "accuracy": next(v for k, v in results["gsm8k"].items() if k not in ("instances", "samples", "seconds"))}


def run_harness(model: str, backend: str, tasks_dir: Path, args) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = {"pretrained": model, "dtype": "float32"}
    if backend == "vllm":
        model_args.update({"max_num_seqs": args.batch_size, "seed": 0})
    t = time.perf_counter()
    out = lm_eval.simple_evaluate(model=backend, model_args=model_args, tasks=["gsm8k_posttrain_prompt"],
                                  task_manager=TaskManager(include_path=str(tasks_dir)), limit=args.limit,
                                  batch_size=args.batch_size, apply_chat_template=True, num_fewshot=0,
                                  log_samples=True, device="cpu")
    seconds = time.perf_counter() - t
    samples = out["samples"]["gsm8k_posttrain_prompt"]
    return {"seconds": seconds, "outputs": [s["resps"][0][0] for s in samples],
            "accuracy": out["results"]["gsm8k_posttrain_prompt"]["exact_match,last_number"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--engines", default="transformers,vllm", help="posttrain eval engines")
    p.add_argument("--harness", default="hf,vllm", help="lm-eval backends")
    args = p.parse_args()
    quiet()
    from posttrain.eval.tasks.gsm8k import INSTRUCTION
    from posttrain.models import load_tokenizer, resolve

    model = resolve(args.model)
    tok = load_tokenizer(model)
    sides = [("posttrain", e) for e in args.engines.split(",") if e] + [("lm-eval", b) for b in args.harness.split(",") if b]
    runs: dict[tuple[str, str], list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "tasks").mkdir()
        (tmp / "tasks" / "gsm8k_posttrain_prompt.yaml").write_text(TASK_YAML.format(
            data=GSM8K, instruction=json.dumps(INSTRUCTION)[1:-1], max_new_tokens=args.max_new_tokens))
        for i in range(args.rounds):
            for side, kind in sides:
                try:
                    r = (run_posttrain(model, kind, tmp / f"{kind}-{i}", args) if side == "posttrain"
                         else run_harness(model, kind, tmp / "tasks", args))
                except Exception as e:  # a backend that does not run here is reported, not fatal
                    print(f"{side} {kind}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                          file=sys.stderr)
                    continue
                r["tokens"] = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in r.pop("outputs"))
                runs[side, kind].append(r)
                print(f"round {i} {side} {kind}: {r['seconds']:.1f} s, {r['tokens']} tokens, accuracy {r['accuracy']:.3f}",
                      file=sys.stderr, flush=True)
    rows = []
    for (side, kind), got in runs.items():
        if not got:
            continue
        row = {"side": side, "engine": kind, "seconds": round(statistics.median(r["seconds"] for r in got), 1),
               "tokens": int(statistics.median(r["tokens"] for r in got)), "accuracy": got[0]["accuracy"]}
        row["tok_s"] = round(row["tokens"] / row["seconds"], 1)
        if "generate_seconds" in got[0]:
            row["generate_seconds"] = round(statistics.median(r["generate_seconds"] for r in got), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["side"] == "lm-eval" and r["engine"] == "hf"), None)
    print(f"\n{args.model}, GSM8K x {args.limit}, at most {args.max_new_tokens} new tokens, batch {args.batch_size}, "
          "greedy, fp32")
    print("| tool | engine | wall seconds | generated tokens | tokens/s | vs lm-eval hf (tokens/s) | accuracy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "-"
        print(f"| {r['side']} | {r['engine']} | {r['seconds']} | {r['tokens']} | {r['tok_s']} | {ratio} | {r['accuracy']:.3f} |")


if __name__ == "__main__":
    main()
