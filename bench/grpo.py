"""GRPO end to end (generate + score + update): ``posttrain rlvr`` against TRL's ``GRPOTrainer``.

    python bench/grpo.py                         # tiny model and SmolLM2-135M-Instruct
    python bench/grpo.py --models smollm2 --steps 4 --rounds 1
    python bench/grpo.py --models smollm2 --batch-size 8,64 --engines transformers,vllm --no-trl
    python bench/grpo.py --models smollm2 --async-steps 0,1 --no-trl

Same model, prompts (GSM8K train questions as chat), G = --generations completions per prompt,
--batch-size completions per step (one optimizer step per rollout batch, no accumulation),
--completion-length new tokens at temperature 1, the same reward (posttrain's ``gsm8k`` verifier),
beta 0, fp32, CPU; TRL with ``use_vllm=False``, ``use_cpu=True``, ``bf16=False`` and gradient
checkpointing off like ours. ``--engines transformers,vllm`` adds posttrain with vLLM rollouts
(``engine: vllm``, colocated: weights pushed every step, old log-probs recomputed); ``vllm-server``
draws them from a ``posttrain serve --engine vllm`` process started for the run (``vllm_servers``,
weights pushed over HTTP; its start is not timed). ``--async-steps 0,1`` runs each engine with rollouts
generated that many steps ahead by a second engine (posttrain.train.rl.async_rollouts) and reports the
share of generation hidden behind training (1 - wait / generate). Rollouts/s =
completions per second over the steps after the first (warm-up, and the vLLM engine's start). The
runs alternate, posttrain first, in this one process.
"""

from __future__ import annotations

import argparse
import json
import os
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


def run_posttrain(model: str, data: Path, out: Path, args, batch: int, engine: str,
                  async_steps: int = 0) -> tuple[float, dict]:
    """Rollouts/s, and the median seconds of a step's parts (steps after the first)."""
    from posttrain.config import RLVRConfig
    from posttrain.config_io import load_config
    from posttrain.train.rlvr import run_rlvr

    server = start_server(model, batch) if engine == "vllm-server" else None
    try:
        cfg = load_config(RLVRConfig, base={
            "model": model, "output_dir": str(out), "overwrite_output_dir": True, "datasets": [{"path": str(data)}],
            "num_generations": args.generations, "per_device_train_batch_size": batch,
            "max_completion_length": args.completion_length, "generation_batch_size": batch, "max_steps": args.steps,
            "learning_rate": 1e-6, "save_steps": 0, "temperature": 1.0, "loss_type": "token_mean",
            "engine": "vllm" if server else engine, "vllm_servers": [server[1]] if server else [],
            "async_steps": async_steps, "vllm_importance_sampling_cap": 2.0 if async_steps else None,
            "decontaminate_against": [], "dtype": getattr(args, "dtype", "float32"),
            "chat_template": getattr(args, "chat_template", None),
            **({"vllm_gpu_memory_utilization": args.vllm_memory} if getattr(args, "vllm_memory", None) and engine == "vllm"
               else {})})
        run_rlvr(cfg)
    finally:
        if server:
            server[0].kill()
            server[0].wait()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    points = [(r["elapsed_seconds"], r["step"] * batch) for r in rows]
    parts = {k: statistics.median(r[k] for r in rows[1:]) for k in ("step_seconds", "generate_seconds", "weight_push_seconds",
                                                                      "async_wait_seconds") if k in rows[-1]}
    if async_steps:  # generation hidden behind training, over the steps after the first
        parts["hidden"] = 1 - sum(r["async_wait_seconds"] for r in rows[1:]) / sum(r["generate_seconds"] for r in rows[1:])
    return rate(points), parts


def start_server(model: str, batch: int):
    """``posttrain serve --engine vllm --accept-weights`` in another process (for ``vllm-server``), once it answers."""
    import secrets
    import socket
    import subprocess

    from posttrain.inference.vllm_servers import ServerFailed, call

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("POSTTRAIN_API_KEY", secrets.token_urlsafe(16))  # the server's and this client's key
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve", "--model", model, "--engine", "vllm",
                             "--accept-weights", "--port", str(port), "--batch-size", str(batch)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {proc.returncode}")
        try:
            call(url, "/health", None, 5.0)
            return proc, url
        except ServerFailed:
            time.sleep(2.0)


def run_trl(model: str, data: Path, out: Path, args, batch: int) -> float:
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.models import load_model, load_tokenizer
    from posttrain.rewards import get_verifier

    verify = get_verifier("gsm8k")

    def reward(prompts, completions, ground_truth, **kw):
        return [verify(c[0]["content"], gt) for c, gt in zip(completions, ground_truth)]

    points: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            points.append((time.perf_counter() - self.t0, state.global_step * batch))

    ds = load_dataset("json", data_files=str(data), split="train").remove_columns(["messages", "verifier"])
    config = GRPOConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=batch,
                        num_generations=args.generations, generation_batch_size=batch,
                        max_completion_length=args.completion_length, learning_rate=1e-6, beta=0.0,
                        temperature=1.0, use_vllm=False, use_cpu=getattr(args, "device", "cpu") == "cpu",
                        bf16=getattr(args, "dtype", "float32") == "bfloat16", gradient_checkpointing=False,
                        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, loss_type="bnpo")
    tokenizer = load_tokenizer(model)
    if getattr(args, "chat_template", None):
        from posttrain.data import chat

        chat.use_template(tokenizer, args.chat_template)
    trainer = GRPOTrainer(model=load_model(model, getattr(args, "dtype", "float32")), reward_funcs=reward, args=config,
                          train_dataset=ds, processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    return rate(points)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--batch-size", default="16", help="completions per step; comma-separated for several, e.g. 8,64")
    p.add_argument("--engines", default="transformers", help="posttrain's rollout engines, e.g. transformers,vllm")
    p.add_argument("--async-steps", default="0", help="async_steps values, e.g. 0,1 (1: rollouts one step ahead)")
    p.add_argument("--trl", action=argparse.BooleanOptionalAction, default=True, help="also TRL's GRPOTrainer")
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
            for batch in (int(b) for b in args.batch_size.split(",")):
                got: dict[str, list[float]] = {}
                for i in range(args.rounds):
                    for engine, k in ((e, int(k)) for e in args.engines.split(",") for k in args.async_steps.split(",")):
                        side = engine + (f"-async{k}" if k else "")
                        speed, parts = run_posttrain(model, data, tmp / f"ours-{name}-{side}-{batch}-{i}", args, batch,
                                                     engine, k)
                        got.setdefault(side, []).append(speed)
                        print(f"{name} batch {batch} round {i}: posttrain ({side}) {speed:.2f} rollouts/s; median seconds "
                              f"per step: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()), file=sys.stderr)
                    if args.trl:
                        got.setdefault("trl", []).append(run_trl(model, data, tmp / f"trl-{name}-{batch}-{i}", args, batch))
                        print(f"{name} batch {batch} round {i}: TRL {got['trl'][-1]:.2f} rollouts/s", file=sys.stderr)
                r = {"model": name, "batch": batch, **{k: round(statistics.median(v), 3) for k, v in got.items()}}
                results.append(r)
                print(json.dumps(r), flush=True)
    print(f"\nG={args.generations}, {args.completion_length} new tokens, {args.steps} steps; rollouts/s")
    sides = [e + (f"-async{k}" if int(k) else "") for e in args.engines.split(",") for k in args.async_steps.split(",")]
    sides += ["trl"] if args.trl else []
    ratios = [(a, b) for a, b in (("vllm", "transformers"), ("vllm-server", "transformers"), ("transformers", "trl"),
                                  ("vllm", "trl"), ("transformers-async1", "transformers"),
                                  ("vllm-server-async1", "vllm-server")) if a in sides and b in sides]
    print("| model | completions/step | " + " | ".join(f"posttrain ({s})" if s != "trl" else "TRL GRPOTrainer" for s in sides)
          + "".join(f" | {a} / {b}" for a, b in ratios) + " |")
    print("|---|---|" + "---|" * (len(sides) + len(ratios)))
    for r in results:
        print(f"| {r['model']} | {r['batch']} | " + " | ".join(str(r[s]) for s in sides)
              + "".join(f" | {r[a] / r[b]:.2f}x" for a, b in ratios) + " |")

if __name__ == "__main__":
    main()
