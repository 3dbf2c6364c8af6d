"""GRPO end to end (generate + score + update): ``posttrain rlvr`` against TRL's ``GRPOTrainer``.

    python bench/grpo.py                         # tiny model and SmolLM2-135M-Instruct
    python bench/grpo.py --models smollm2 --steps 4 --rounds 1

Same model, prompts (GSM8K train questions as chat), G = --generations completions per prompt,
--batch-size completions per step (one optimizer step per rollout batch, no accumulation),
--completion-length new tokens at temperature 1, the same reward (posttrain's ``gsm8k`` verifier),
beta 0, fp32, CPU; TRL with ``use_vllm=False``, ``use_cpu=True``, ``bf16=False`` and gradient
checkpointing off like ours. Rollouts/s = completions per second over the steps after the first
(warm-up). The runs alternate, posttrain first, in this one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import DATA, quiet, rate, tiny_model

GSM8K = DATA / "gsm8k" / "train.jsonl"


def prompts_file(path: Path, n: int) -> Path:
    from posttrain.data.adapters import gsm8k_final_answer

    with open(GSM8K) as f, open(path, "w") as out:
        for line, _ in zip(f, range(n)):
            r = json.loads(line)
            out.write(json.dumps({"prompt": [{"role": "user", "content": r["question"]}],
                                  "messages": [{"role": "user", "content": r["question"]}],
                                  "ground_truth": gsm8k_final_answer(r["answer"]), "verifier": "gsm8k"}) + "\n")
    return path


def run_posttrain(model: str, data: Path, out: Path, args) -> float:
    from posttrain.config import RLVRConfig, load_config
    from posttrain.train.rlvr import run_rlvr

    cfg = load_config(RLVRConfig, base={
        "model": model, "output_dir": str(out), "overwrite_output_dir": True, "datasets": [{"path": str(data)}],
        "num_generations": args.generations, "per_device_train_batch_size": args.batch_size,
        "max_completion_length": args.completion_length, "generation_batch_size": args.batch_size, "max_steps": args.steps,
        "learning_rate": 1e-6, "save_steps": 0, "temperature": 1.0, "loss_type": "token_mean"})
    run_rlvr(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    points = [(r["elapsed_seconds"], r["step"] * args.batch_size) for r in rows]
    return rate(points)


def run_trl(model: str, data: Path, out: Path, args) -> float:
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.rewards import get_verifier

    verify = get_verifier("gsm8k")

    def reward(prompts, completions, ground_truth, **kw):
        return [verify(c[0]["content"], gt) for c, gt in zip(completions, ground_truth)]

    points: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            points.append((time.perf_counter() - self.t0, state.global_step * args.batch_size))

    ds = load_dataset("json", data_files=str(data), split="train").remove_columns(["messages", "verifier"])
    config = GRPOConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                        num_generations=args.generations, generation_batch_size=args.batch_size,
                        max_completion_length=args.completion_length, learning_rate=1e-6, beta=0.0,
                        temperature=1.0, use_vllm=False, use_cpu=True, bf16=False, gradient_checkpointing=False,
                        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, loss_type="bnpo")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=ds, callbacks=[Clock()])
    trainer.train()
    return rate(points)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16, help="completions per step")
    p.add_argument("--completion-length", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    quiet()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prompts_file(tmp / "prompts.jsonl", 200)
        for name in args.models.split(","):
            if name == "tiny":
                texts = [json.loads(x)["messages"][0]["content"] for x in data.read_text().splitlines()]
                model = tiny_model(tmp / "tiny", texts)
            else:
                from posttrain.models import resolve

                model = resolve("smollm2-135m-instruct")
            ours, theirs = [], []
            for i in range(args.rounds):
                ours.append(run_posttrain(model, data, tmp / f"ours-{name}-{i}", args))
                theirs.append(run_trl(model, data, tmp / f"trl-{name}-{i}", args))
                print(f"{name} round {i}: posttrain {ours[-1]:.2f} vs TRL {theirs[-1]:.2f} rollouts/s", file=sys.stderr)
            r = {"model": name, "posttrain_rollouts_s": round(statistics.median(ours), 3),
                 "trl_rollouts_s": round(statistics.median(theirs), 3)}
            r["ratio"] = round(r["posttrain_rollouts_s"] / r["trl_rollouts_s"], 2)
            results.append(r)
            print(json.dumps(r), flush=True)
    print(f"\nG={args.generations}, {args.batch_size} completions/step, {args.completion_length} new tokens, {args.steps} steps")
    print("| model | posttrain rollouts/s | TRL GRPOTrainer rollouts/s | ratio |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['posttrain_rollouts_s']} | {r['trl_rollouts_s']} | {r['ratio']}x |")


if __name__ == "__main__":
    main()
