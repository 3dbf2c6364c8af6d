"""SFT throughput: posttrain against TRL's SFTTrainer, same model, data, lengths and batch, alternating.

    python bench/sft.py                      # tiny model and SmolLM2-135M-Instruct
    python bench/sft.py --models tiny --steps 20 --rounds 3
    python bench/sft.py --models gemma3-270m --steps 4 --rounds 1 --batch-size 2 --max-length 1024 \
        --gradient-checkpointing off --freeze-embeddings off,on --chat-template gemma   # the 262k-vocabulary head

Both train on GSM8K solutions (data/gsm8k/train.jsonl) rendered with the model's chat
template, loss on the assistant reply only, packed to --max-length tokens per row, batch
--batch-size rows, fp32, on the CPU. Throughput counts non-padding input tokens per second of training
steps, leaving out the first step of each run (warm-up). Achieved FLOP/s = 6 x parameters x
tokens/s, compared with a fp32 matmul measured in the same process. ``--freeze-embeddings on``
keeps the embeddings and the tied head fixed on both sides (ours: ``freeze_embeddings``; TRL: the
same parameters set to ``requires_grad=False`` before the trainer is built).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import DATA, matmul_flops, quiet, rate, tiny_model

GSM8K = DATA / "gsm8k" / "train.jsonl"


def gsm8k_conversations(n: int) -> list[dict]:
    from posttrain.data.adapters import gsm8k_solution

    out = []
    with open(GSM8K) as f:
        for line, _ in zip(f, range(n)):
            r = json.loads(line)
            out.append({"prompt": [{"role": "user", "content": r["question"]}],
                        "completion": [{"role": "assistant", "content": gsm8k_solution(r["answer"])}]})
    return out


def tiny(workdir: Path) -> str:
    texts = [c["prompt"][0]["content"] + " " + c["completion"][0]["content"] for c in gsm8k_conversations(2000)]
    return tiny_model(workdir / "tiny", texts)


def run_posttrain(model: str, data: Path, out: Path, args) -> float:
    from posttrain.config import SFTConfig
    from posttrain.config_io import load_config
    from posttrain.train.sft import run_sft

    cfg = load_config(SFTConfig, base={
        "model": model, "output_dir": str(out), "datasets": [{"path": str(data)}], "packing": True,
        "max_seq_length": args.max_length, "per_device_train_batch_size": args.batch_size, "max_steps": args.steps,
        "learning_rate": 2e-5, "save_steps": 0, "logging_steps": 1, "overwrite_output_dir": True,
        "gradient_checkpointing": args.gc, "freeze_embeddings": args.freeze, "chat_template": args.chat_template,
        "dtype": getattr(args, "dtype", "float32"),
        "decontaminate_against": getattr(args, "decontaminate_against", None)})
    run_sft(cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return rate([(x["elapsed_seconds"], x["num_input_tokens_seen"]) for x in lines])


def run_trl(model: str, data: Path, out: Path, args) -> float:
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from posttrain.models import load_model, load_tokenizer

    points: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            points.append((time.perf_counter() - self.t0, state.num_input_tokens_seen))

    config = SFTConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                       gradient_accumulation_steps=1, learning_rate=2e-5, max_length=args.max_length, packing=True,
                       use_cpu=getattr(args, "device", "cpu") == "cpu", bf16=getattr(args, "dtype", "float32") == "bfloat16",
                       fp16=False, logging_steps=args.steps, save_strategy="no", report_to=[],
                       include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, seed=42,
                       disable_tqdm=True, gradient_checkpointing=args.gc)
    policy = load_model(model, getattr(args, "dtype", "float32"))
    if args.freeze:
        for emb in (policy.get_input_embeddings(), policy.get_output_embeddings()):
            emb.weight.requires_grad_(False)
    tokenizer = load_tokenizer(model)
    if args.chat_template:
        from posttrain.data import chat

        chat.use_template(tokenizer, args.chat_template)
    trainer = SFTTrainer(model=policy, args=config, train_dataset=load_dataset("json", data_files=str(data),
                         split="train"), processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    return rate(points)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per run (default: 30 tiny, 4 SmolLM2)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (posttrain, TRL, posttrain, TRL, ...)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--gradient-checkpointing", default="off,on",
                   help="settings to run, both sides alike (TRL's default is on): off, on or off,on")
    p.add_argument("--freeze-embeddings", default="off", help="off, on or off,on (both sides alike)")
    p.add_argument("--chat-template", help="both sides render with this template (gemma for the gemma3-270m base "
                                           "model, which has none)")
    args = p.parse_args()
    import transformers

    quiet()
    from posttrain.models import load_model

    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    convs = gsm8k_conversations(args.examples)
    trl_data = work / "trl.jsonl"
    trl_data.write_text("".join(json.dumps(c) + "\n" for c in convs))
    ours_data = work / "ours.jsonl"
    ours_data.write_text("".join(json.dumps({"messages": c["prompt"] + c["completion"]}) + "\n" for c in convs))
    peak = matmul_flops()
    print(f"fp32 matmul (2048^3, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s", flush=True)
    rows = []
    for name in args.models.split(","):
        model = tiny(work) if name == "tiny" else name
        n_params = sum(p.numel() for p in load_model(model).parameters())
        for gc, freeze in [(g, f) for g in args.gradient_checkpointing.split(",") for f in args.freeze_embeddings.split(",")]:
            run_args = argparse.Namespace(**{**vars(args), "gc": gc == "on", "freeze": freeze == "on",
                                             "steps": args.steps or (30 if name == "tiny" else 4)})
            ours, theirs = [], []
            for r in range(args.rounds):
                ours.append(run_posttrain(model, ours_data, work / f"ours-{name}-{gc}-{freeze}-{r}", run_args))
                theirs.append(run_trl(model, trl_data, work / f"trl-{name}-{gc}-{freeze}-{r}", run_args))
                print(f"{name} checkpointing {gc} frozen embeddings {freeze} round {r + 1}: posttrain {ours[-1]:.1f} "
                      f"tok/s, TRL {theirs[-1]:.1f} tok/s", flush=True)
            o, t = statistics.median(ours), statistics.median(theirs)
            rows.append((name, gc, freeze, n_params, o, t, 6 * n_params * o / peak))
    print("\n| model | gradient checkpointing | frozen embeddings | params | posttrain tok/s | TRL tok/s | ratio "
          "| posttrain FLOP/s vs matmul |")
    print("|---|---|---|---|---|---|---|---|")
    for name, gc, freeze, n, o, t, frac in rows:
        print(f"| {name} | {gc} | {freeze} | {n / 1e6:.1f}M | {o:.1f} | {t:.1f} | {o / t:.2f}x | {frac:.0%} |")
    print(f"\nmatmul peak {peak / 1e9:.1f} GFLOP/s; batch {args.batch_size} x {args.max_length} tokens, packed, fp32; "
          f"torch {torch.__version__}, transformers {transformers.__version__}", file=sys.stdout)


if __name__ == "__main__":
    main()
