"""DPO throughput and memory: posttrain against TRL's DPOTrainer, same model, pairs, lengths and batch.

    python bench/dpo.py                      # tiny model and SmolLM2-135M-Instruct
    python bench/dpo.py --models tiny --steps 20 --rounds 3

Both use the sigmoid DPO loss (beta 0.1) with reference log-probs computed before training
(TRL: ``precompute_ref_log_probs=True``), fp32 on the CPU (``use_cpu=True, bf16=False``), the same
hh-rlhf helpful-base test pairs (short ones, so neither side truncates), ``--batch`` pairs per
step. Throughput = pairs per second over the training steps after the first; the time before the
first step (data preparation and the reference pass) is reported separately. Every run is its own
subprocess, so peak memory is that run's own peak resident set size (``ru_maxrss``: model,
optimizer, activations, libraries).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA, quiet, rate, tiny_model


def hh_pairs(n: int, max_chars: int) -> list[dict]:
    from posttrain.data.adapters import to_kind
    from posttrain.data.records import preference_problem

    out = []
    with gzip.open(DATA / "hh_rlhf" / "helpful-base_test.jsonl.gz", "rt") as f:
        for i, line in enumerate(f):
            raw = json.loads(line)
            if max(len(raw["chosen"]), len(raw["rejected"])) > max_chars:
                continue
            pair = to_kind(raw, "preference", "auto", f"line {i + 1}")
            if preference_problem(pair) is None:
                out.append({"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]})
            if len(out) == n:
                break
    return out


def run_posttrain(model: str, data: Path, out: Path, args) -> tuple[float, float, float]:
    from posttrain.config import DPOConfig
    from posttrain.config_io import load_config
    from posttrain.train.dpo import run_dpo

    cfg = load_config(DPOConfig, base={
        "model": model, "output_dir": str(out), "datasets": [{"path": str(data)}], "loss_type": "dpo", "beta": 0.1,
        "max_seq_length": args.max_length, "per_device_train_batch_size": args.batch_size, "max_steps": args.steps,
        "learning_rate": 5e-7, "save_steps": 0, "logging_steps": 1, "overwrite_output_dir": True,
        "per_device_eval_batch_size": args.batch_size, "gradient_checkpointing": args.gc,
        "dtype": getattr(args, "dtype", "float32"), "chat_template": getattr(args, "chat_template", None),
        "decontaminate_against": getattr(args, "decontaminate_against", None)})
    os.environ["POSTTRAIN_CACHE"] = str(out / "cache")  # a fresh reference cache: time the reference pass
    t = time.perf_counter()
    run_dpo(cfg)
    total = time.perf_counter() - t
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_seconds = lines[-1]["elapsed_seconds"]
    return rate([(x["elapsed_seconds"], x["step"] * args.batch_size) for x in lines]), total - train_seconds


def run_trl(model: str, data: Path, out: Path, args) -> tuple[float, float, float]:
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from posttrain.models import load_model, load_tokenizer

    points: list[tuple[float, float]] = []
    begin: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            begin.setdefault("t", time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            points.append((time.perf_counter(), state.global_step * args.batch_size))

    config = DPOConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                       gradient_accumulation_steps=1, learning_rate=5e-7, beta=0.1, loss_type=["sigmoid"],
                       max_length=args.max_length, precompute_ref_log_probs=True,
                       precompute_ref_batch_size=args.batch_size, use_cpu=getattr(args, "device", "cpu") == "cpu",
                       bf16=getattr(args, "dtype", "float32") == "bfloat16", fp16=False,
                       logging_steps=args.steps, save_strategy="no", report_to=[], dataloader_num_workers=0,
                       seed=42, disable_tqdm=True, gradient_checkpointing=args.gc)
    t = time.perf_counter()
    tokenizer = load_tokenizer(model)
    if getattr(args, "chat_template", None):
        from posttrain.data import chat

        chat.use_template(tokenizer, args.chat_template)
    trainer = DPOTrainer(model=load_model(model, getattr(args, "dtype", "float32")), args=config, processing_class=tokenizer,
                         train_dataset=load_dataset("json", data_files=str(data), split="train"),
                         callbacks=[Clock()])
    trainer.train()
    return rate(points), begin["t"] - t


def child(args) -> None:
    """One run in this process; prints its figures as a JSON line."""
    quiet()
    run = run_posttrain if args.child == "posttrain" else run_trl
    pairs_per_s, before = run(args.model, Path(args.data), Path(args.output), args)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"pairs_per_s": pairs_per_s, "peak_mib": peak_mib, "before_s": before}), flush=True)


def spawn(which: str, model: str, data: Path, out: Path, args) -> tuple[float, float, float]:
    cmd = [sys.executable, __file__, "--child", which, "--model", model, "--data", str(data), "--output", str(out),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    cmd += ["--gc"] if args.gc else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{which} run failed:\n{proc.stderr[-3000:]}")
    r = json.loads(line[len("RESULT "):])
    return r["pairs_per_s"], r["peak_mib"], r["before_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default: 30 tiny, 5 SmolLM2)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--gradient-checkpointing", default="off,on",
                   help="settings to run, both sides alike (TRL's default is on): off, on or off,on")
    p.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", choices=["posttrain", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    quiet()
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    pairs = hh_pairs(args.pairs, max_chars=600)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in pairs))
    rows = []
    for name in args.models.split(","):
        if name == "tiny":
            texts = [m["content"] for x in pairs for m in x["prompt"] + x["chosen"] + x["rejected"]]
            model = tiny_model(work / "tiny", texts * 5)
        else:
            from posttrain.models import resolve

            model = resolve(name)  # converted and cached once, before the runs move the cache
        for gc in args.gradient_checkpointing.split(","):
            run_args = argparse.Namespace(**{**vars(args), "gc": gc == "on",
                                             "steps": args.steps or (30 if name == "tiny" else 5)})
            ours, theirs = [], []
            for r in range(args.rounds):
                ours.append(spawn("posttrain", model, data, work / f"ours-{name}-{gc}-{r}", run_args))
                theirs.append(spawn("trl", model, data, work / f"trl-{name}-{gc}-{r}", run_args))
                print(f"{name} checkpointing {gc} round {r + 1}: posttrain {ours[-1][0]:.2f} pairs/s, "
                      f"peak {ours[-1][1]:.0f} MiB, before training {ours[-1][2]:.1f} s | TRL {theirs[-1][0]:.2f} "
                      f"pairs/s, peak {theirs[-1][1]:.0f} MiB, before training {theirs[-1][2]:.1f} s", flush=True)
            med = lambda runs, i: statistics.median(x[i] for x in runs)  # noqa: E731
            rows.append((name, gc, med(ours, 0), med(theirs, 0), med(ours, 1), med(theirs, 1)))
    print(f"\n{len(pairs)} hh-rlhf pairs, batch {args.batch_size} pairs, max length {args.max_length}, fp32, CPU")
    print("| model | gradient checkpointing | posttrain pairs/s | TRL pairs/s | ratio | posttrain peak RSS MiB | "
          "TRL peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, gc, o, t, om, tm in rows:
        print(f"| {name} | {gc} | {o:.2f} | {t:.2f} | {o / t:.2f}x | {om:.0f} | {tm:.0f} |")


if __name__ == "__main__":
    main()
