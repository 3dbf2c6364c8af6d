"""``posttrain demo``: the whole recipe on its embedded default, on a laptop CPU.

A tiny Llama and tokenizer are built from scratch, then ``posttrain/recipes/demo.yaml`` runs through
``posttrain run``: mid-training on addition text (warmup + cosine), an anneal on addition +
multiplication text (linear to zero), SFT on half of the training problems, DPO on on-policy pairs
(the SFT model sampled on all training problems, chosen = verified correct, rejected = wrong), and
GRPO, each followed by an evaluation on held-out problems that no stage trains on (checked when the
data is written); then a majority-vote sweep on the final model (``tts`` with plain sampling: the
demo model answers directly, it has no thinking to budget). The table, ``summary.json`` and
``summary.png`` give the held-out accuracy after every stage (addition, multiplication, both), its
gain, tokens and time, and say which post-training stages did not gain. Re-running skips finished
stages; an interrupted run resumes (``posttrain run`` semantics).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from posttrain.atomic import write_json, write_text
from posttrain.data.synth import arithmetic as ar
from posttrain.eval.runner import evaluate
from posttrain.models import build_tiny
from posttrain.pipeline import run
from posttrain.util import log

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


def op_of(prompt: list[dict]) -> str:
    """The operation of a demo question ("What is 7 * 8?")."""
    return next(op for op in OPS if f" {ar.SYMBOLS[op]} " in prompt[-1]["content"])


def heldout_accuracy(eval_dir: Path) -> dict:
    """Overall and per-operation held-out accuracy from an evaluation's samples."""
    samples = [json.loads(x) for x in (eval_dir / "samples.jsonl").read_text().splitlines()]
    per_op = {op: [s["score"] for s in samples if op_of(s["prompt"]) == op] for op in OPS}
    return {"heldout_accuracy": round(sum(s["score"] for s in samples) / len(samples), 4),
            **{op: round(sum(v) / len(v), 4) for op, v in per_op.items()}}


def majority_accuracy(tts_dir: Path, ks: list[int]) -> dict:
    """Held-out majority@k accuracy (overall and per operation) from a ``sampling`` sweep's samples."""
    from posttrain.eval.tts import majority

    by_instance: dict[int, list[dict]] = {}
    for line in (tts_dir / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_instance.setdefault(row["index"], []).append(row)
    out = {}
    for k in ks:
        votes = {i: majority(rows, k) for i, rows in by_instance.items()}
        per_op = {op: [v for i, v in votes.items() if op_of(by_instance[i][0]["prompt"]) == op] for op in OPS}
        out[k] = {"heldout_accuracy": round(sum(votes.values()) / len(votes), 4),
                  **{op: round(sum(v) / len(v), 4) for op, v in per_op.items()}}
    return out


def stage_tokens(entry: dict) -> int | None:
    """Tokens a stage trained on (its loop's count), or for RL the tokens it generated."""
    manifest = Path(entry["output_dir"]) / "manifest.json"
    if not manifest.is_file():
        return None
    m = json.loads(manifest.read_text())
    if m["stage"] != "rlvr":
        return int(m["metrics"]["num_input_tokens_seen"])
    lines = (Path(entry["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    per_step = m["config"]["per_device_train_batch_size"] * m["config"]["gradient_accumulation_steps"]
    return int(sum(json.loads(x).get("completion_tokens", 0) * per_step for x in lines if '"completion_tokens"' in x))


def plot_summary(stages: list[dict], path: Path) -> None:
    from posttrain.eval import plots

    fig, ax = plots.figure()
    xs = range(len(stages))
    for j, (key, label) in enumerate((("heldout_accuracy", "all"), ("add", "addition"), ("mul", "multiplication"))):
        ax.bar([x + (j - 1) * 0.27 for x in xs], [s[key] for s in stages], width=0.27, label=label)
    ax.set_xticks(list(xs), [s["stage"] for s in stages], rotation=20)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("posttrain demo: held-out accuracy after each stage")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    plots.save(fig, path)


def run_demo(out: str = "runs/demo", overrides: list[str] | tuple[str, ...] = ()) -> list[dict]:
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
    if not (root / "eval-base" / "results.json").is_file():
        evaluate(str(base), ["verifiable"], root / "eval-base", data={"verifiable": str(root / "data" / "heldout.jsonl")},
                 batch_size=64)
    stages = [{"stage": "base", **heldout_accuracy(root / "eval-base"), "tokens": 0, "seconds": round(time.time() - t, 1)}]
    summary = run(recipe, list(overrides))
    for i, entry in enumerate(summary):
        if entry["kind"] == "eval":
            trained = summary[i - 1] if summary[i - 1]["kind"] != "onpolicy_pairs" else summary[i - 2]
            row = {"stage": trained["stage"], **heldout_accuracy(Path(entry["output_dir"])), "tokens": stage_tokens(trained),
                   "seconds": round(trained["seconds"] + entry["seconds"], 1)}
            if trained["kind"] == "dpo":
                row["seconds"] = round(row["seconds"] + summary[i - 2]["seconds"], 1)  # the on-policy pairs too
            stages.append(row)
    for prev, row in zip(stages, stages[1:]):
        row["gain"] = round(row["heldout_accuracy"] - prev["heldout_accuracy"], 4)
    tts = next((e for e in summary if e["kind"] == "tts"), None)
    if tts is not None:
        ks = sorted({p["majority"] for p in tts["results"]})
        votes = majority_accuracy(Path(tts["output_dir"]), ks)
        stages.append({"stage": f"{stages[-1]['stage']} + majority@{ks[-1]}", **votes[ks[-1]],
                       "majority": {str(k): v["heldout_accuracy"] for k, v in votes.items()},
                       "tokens": None, "seconds": tts["seconds"], "gain": round(votes[ks[-1]]["heldout_accuracy"]
                                                                                - stages[-1]["heldout_accuracy"], 4)})
    write_json(root / "summary.json", stages)
    plot_summary(stages, root / "summary.png")
    print(f"\n{'stage':22}{'held-out':>10}{'add':>8}{'mul':>8}{'gain':>8}{'tokens':>10}{'seconds':>9}")
    for row in stages:
        gain = "" if "gain" not in row else f"{row['gain']:+.2f}"
        tokens = "" if row["tokens"] is None else row["tokens"]
        print(f"{row['stage']:22}{row['heldout_accuracy']:>10.2f}{row['add']:>8.2f}{row['mul']:>8.2f}{gain:>8}{tokens:>10}"
              f"{row['seconds']:>9}")
    if tts is not None:
        print("majority voting on the final model (temperature sampling): "
              + ", ".join(f"@{k} {v}" for k, v in stages[-1]["majority"].items()))
    post = [r for r in stages if r["stage"] in ("sft", "dpo", "rlvr")]
    flat = [r["stage"] for r in post if r["gain"] <= 0]
    print(f"\n{'every post-training stage improved held-out accuracy' if not flat else 'no gain from: ' + ', '.join(flat)}; "
          f"{round(time.time() - started, 1)} s; report in {root / 'report.md'}, table in {root / 'summary.json'}, "
          f"plot in {root / 'summary.png'}")
    print(f"chat with every stage, side by side: posttrain serve --run {root}")
    return stages
