"""``posttrain demo``: the main job on its embedded default, on a laptop CPU.

``run_demo`` (``posttrain demo``): a tiny Llama and tokenizer built from scratch are fine-tuned (SFT,
packing, assistant-only loss) on single-digit additions; greedy accuracy on the training prompts and
on held-out prompts, before and after.

``run_full_demo`` (``posttrain demo --full``): the whole recipe through ``posttrain/recipes/demo.yaml``:
mid-training on addition text (warmup + cosine), an anneal on addition + multiplication text (linear to
zero), SFT on half of the training problems, DPO on on-policy pairs (the SFT model sampled on all
training problems, chosen = verified correct, rejected = wrong), and GRPO, each followed by an
evaluation on held-out problems that no stage trains on (checked when the data is written). The table
and ``summary.json`` give the held-out accuracy after every stage (addition, multiplication, both), its
time and its gain, and say which post-training stages did not gain. Re-running skips finished stages;
an interrupted run resumes (``posttrain run`` semantics).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from posttrain.atomic import write_json, write_text
from posttrain.config import SFTConfig, load_config
from posttrain.data.synth import arithmetic as ar
from posttrain.data.synth.arithmetic import addition_problems, addition_record, split_problems
from posttrain.eval.runner import evaluate
from posttrain.inference.engine import SamplingParams, TransformersEngine
from posttrain.models import build_tiny, load_model, load_tokenizer
from posttrain.pipeline import run
from posttrain.train.loop import log
from posttrain.train.sft import run_sft

RECIPE = Path(__file__).parent / "recipes" / "demo.yaml"
OPS = ("add", "mul")
SIZES = {"add": (20, 400, 80), "mul": (10, 100, 20)}  # operands below; problems; held out


def write_data(root: Path) -> None:
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = {"sft.jsonl": [], "rlvr.jsonl": [], "heldout.jsonl": []}
    for op in OPS:
        high, n, n_held = SIZES[op]
        train, heldout = ar.split_problems(ar.problems(op, n, digits=1, seed=0, high=high), n_held)
        ar.check_disjoint([ar.question(op, a, b) for a, b in train], [ar.question(op, a, b) for a, b in heldout])
        write_text(data / f"corpus_{op}.txt", "".join(f"Question: {ar.question(op, a, b)} Answer: {ar.answer(op, a, b)}\n"
                                                      for a, b in train))
        # SFT sees half of the training problems; DPO and RL prompts cover all of them (verifier signal only)
        files["sft.jsonl"] += [json.dumps(ar.sft_record(op, a, b, worked=False)) for a, b in train[:len(train) // 2]]
        files["rlvr.jsonl"] += [json.dumps(ar.rlvr_record(op, a, b)) for a, b in train]
        files["heldout.jsonl"] += [json.dumps(ar.rlvr_record(op, a, b)) for a, b in heldout]
    for name, lines in files.items():
        write_text(data / name, "".join(line + "\n" for line in lines))


def heldout_accuracy(eval_dir: Path) -> dict:
    """Overall and per-operation held-out accuracy from an evaluation's samples."""
    samples = [json.loads(x) for x in (eval_dir / "samples.jsonl").read_text().splitlines()]
    per_op = {op: [s["score"] for s in samples if f" {ar.SYMBOLS[op]} " in s["prompt"][-1]["content"]] for op in OPS}
    return {"heldout_accuracy": round(sum(s["score"] for s in samples) / len(samples), 4),
            **{op: round(sum(v) / len(v), 4) for op, v in per_op.items()}}


def run_full_demo(out: str = "runs/demo-full", overrides: list[str] | tuple[str, ...] = ()) -> list[dict]:
    started = time.time()
    root = Path(out)
    write_data(root)
    base = root / "tiny-base"
    if not (base / "config.json").exists():
        corpus = [line for op in OPS for line in (root / "data" / f"corpus_{op}.txt").read_text().splitlines()]
        build_tiny(base, corpus, vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, seed=0)
        log(f"demo: built a tiny Llama and tokenizer at {base}")
    recipe = root / "recipe.yaml"
    write_text(recipe, RECIPE.read_text().replace("{out}", str(root)))
    t = time.time()
    evaluate(str(base), ["verifiable"], root / "eval-base", data={"verifiable": str(root / "data" / "heldout.jsonl")},
             batch_size=64)
    stages = [{"stage": "base", **heldout_accuracy(root / "eval-base"), "seconds": round(time.time() - t, 1)}]
    summary = run(recipe, list(overrides))
    for i, entry in enumerate(summary):
        if entry["kind"] == "eval":
            trained = summary[i - 1] if summary[i - 1]["kind"] != "onpolicy_pairs" else summary[i - 2]
            row = {"stage": trained["stage"], **heldout_accuracy(Path(entry["output_dir"])),
                   "seconds": round(trained["seconds"] + entry["seconds"], 1)}
            if trained["kind"] == "dpo":
                row["seconds"] = round(row["seconds"] + summary[i - 2]["seconds"], 1)  # the on-policy pairs too
            stages.append(row)
    for prev, row in zip(stages, stages[1:]):
        row["gain"] = round(row["heldout_accuracy"] - prev["heldout_accuracy"], 4)
    write_json(root / "summary.json", stages)
    print(f"\n{'stage':10}{'held-out':>10}{'add':>8}{'mul':>8}{'gain':>8}{'seconds':>9}")
    for row in stages:
        gain = "" if "gain" not in row else f"{row['gain']:+.2f}"
        print(f"{row['stage']:10}{row['heldout_accuracy']:>10.2f}{row['add']:>8.2f}{row['mul']:>8.2f}{gain:>8}{row['seconds']:>9}")
    post = [r for r in stages if r["stage"] in ("sft", "dpo", "rlvr")]
    flat = [r["stage"] for r in post if r["gain"] <= 0]
    print(f"\n{'every post-training stage improved held-out accuracy' if not flat else 'no gain from: ' + ', '.join(flat)}; "
          f"{round(time.time() - started, 1)} s; report in {root / 'report.md'}, summary in {root / 'summary.json'}")
    return stages


def greedy_accuracy(model_dir: str, problems: list[tuple[int, int]]) -> float:
    engine = TransformersEngine(load_model(model_dir), load_tokenizer(model_dir), batch_size=64)
    prompts = [addition_record(a, b)["messages"][:1] for a, b in problems]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=4))
    return sum(o.text.strip() == str(a + b) for o, (a, b) in zip(outs, problems)) / len(problems)


def run_demo(out: str = "runs/demo", overrides: list[str] | tuple[str, ...] = ()) -> dict:
    started = time.time()
    root = Path(out)
    problems = addition_problems(100, digits=1, seed=0)
    train_set, heldout = split_problems(problems, 20)
    data = root / "data" / "addition_train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(addition_record(a, b)) + "\n" for a, b in train_set))
    base = root / "tiny-base"
    if not (base / "config.json").exists():
        corpus = [json.dumps(addition_record(a, b)) for a, b in problems]
        build_tiny(base, corpus, vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, seed=0)
        log(f"demo: built a tiny Llama and tokenizer at {base}")
    cfg: SFTConfig = load_config(SFTConfig, overrides=list(overrides), base={
        "model": str(base), "output_dir": str(root / "sft"), "chat_template": "tulu",
        "datasets": [{"path": str(data), "license": "CC0-1.0"}], "max_seq_length": 64, "packing": True,
        "per_device_train_batch_size": 4, "learning_rate": 3e-3, "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.05, "max_steps": 500, "save_steps": 100, "logging_steps": 10, "seed": 0})
    before = {"train": greedy_accuracy(str(base), train_set), "heldout": greedy_accuracy(str(base), heldout)}
    result = run_sft(cfg)
    after = {"train": greedy_accuracy(cfg.output_dir, train_set), "heldout": greedy_accuracy(cfg.output_dir, heldout)}
    summary = {"task": "single-digit addition", "train_problems": len(train_set), "heldout_problems": len(heldout),
               "before": before, "after": after, "final_loss": result.metrics.get("loss"),
               "model": cfg.output_dir, "seconds": round(time.time() - started, 1)}
    write_json(root / "summary.json", summary)
    print(f"\n{'':10}{'train acc':>12}{'held-out acc':>14}")
    print(f"{'base':10}{before['train']:>12.1%}{before['heldout']:>14.1%}")
    print(f"{'sft':10}{after['train']:>12.1%}{after['heldout']:>14.1%}")
    print(f"\nfinal loss {summary['final_loss']}, {summary['seconds']} s; model in {cfg.output_dir}, "
          f"summary in {root / 'summary.json'}")
    return summary
