"""Multi-turn GRPO with the python tool: ``posttrain rlvr`` with ``env: python`` against TRL's
``GRPOTrainer`` with ``environment_factory``.

    python bench/grpo_tools.py --model runs/smollm2-135m-python/sft     # a model that calls the tool
    python bench/grpo_tools.py --model smollm2-135m-instruct --steps 3

Same model, tokenizer and chat template on both sides: the model's weights with TRL's Qwen2.5 template
(a template that renders ``tools`` and ``tool_calls``, which TRL requires and whose calls it can parse;
posttrain renders and parses with it too). Same prompts (GSM8K train questions with the GSM8K task's
instruction, the python environment's system prompt), G = --generations episodes per prompt,
--batch-size episodes per step (one optimizer step per rollout batch), temperature 1, beta 0, fp32,
CPU, transformers generation on both (TRL ``use_vllm=False``), the same reward (posttrain's ``gsm8k``
verifier on the final answer) and the same tool: each episode's calls run in one posttrain sandbox
(``PythonEnv``), TRL's through an ``environment_factory`` class whose ``python`` method calls it.
At most --max-turns model turns (TRL: ``max_tool_calling_iterations`` = turns - 1); TRL's
``max_completion_length`` bounds the whole episode, so posttrain's ``max_episode_tokens`` is set to
it (and each posttrain turn may use all of it). Episodes/s over the steps after the first (warm-up);
tool calls per episode are counted on both sides. The runs alternate, posttrain first, in this one
process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import DATA, quiet, rate

GSM8K = DATA / "gsm8k" / "train.jsonl"


def template() -> str:
    from trl.chat_template_utils import qwen2_5_chat_template

    return qwen2_5_chat_template


def prompts_file(path: Path, n: int) -> Path:
    from posttrain.data.adapters import GSM8K_INSTRUCTION, gsm8k_final_answer
    from posttrain.envs.python import PythonEnv

    system = PythonEnv.system_prompt
    with open(GSM8K) as f, open(path, "w") as out:
        for line, _ in zip(f, range(n)):
            r = json.loads(line)
            user = {"role": "user", "content": r["question"] + GSM8K_INSTRUCTION}
            out.write(json.dumps({"prompt": [{"role": "system", "content": system}, user], "messages": [user],
                                  "ground_truth": gsm8k_final_answer(r["answer"]), "verifier": "gsm8k"}) + "\n")
    return path


def run_posttrain(model: str, data: Path, out: Path, args) -> tuple[float, float]:
    """Episodes/s and tool calls per episode."""
    from posttrain.config import RLVRConfig
    from posttrain.config_io import load_config
    from posttrain.train.rlvr import run_rlvr

    cfg = load_config(RLVRConfig, base={
        "model": model, "output_dir": str(out), "overwrite_output_dir": True, "datasets": [{"path": str(data)}],
        "num_generations": args.generations, "per_device_train_batch_size": args.batch_size,
        "generation_batch_size": args.batch_size, "max_completion_length": args.completion_length,
        "max_episode_tokens": args.completion_length, "max_turns": args.max_turns, "env": "python",
        "max_steps": args.steps, "learning_rate": 1e-6, "save_steps": 0, "temperature": 1.0,
        "loss_type": "token_mean", "decontaminate_against": [], "chat_template": template()})
    run_rlvr(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    points = [(r["elapsed_seconds"], r["step"] * args.batch_size) for r in rows]
    return rate(points), statistics.mean(r["tool_calls"] for r in rows)


def run_trl(model: str, data: Path, out: Path, args) -> tuple[float, float]:
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.data import chat
    from posttrain.envs.python import PythonEnv
    from posttrain.models import load_model, load_tokenizer
    from posttrain.rewards import get_verifier

    verify = get_verifier("gsm8k")
    calls = [0]
    env = PythonEnv()

    class PythonTool:
        """One sandboxed interpreter per episode (posttrain's), as TRL's environment."""

        def __init__(self):
            self.state = {}

        def reset(self, **kwargs) -> None:
            env.close(self.state)
            self.state = env.reset({"messages": [], "ground_truth": "", "verifier": "gsm8k"}).state

        def python(self, code: str) -> str:
            """Run Python code in a persistent interpreter and see what it prints.

            Args:
                code: Python code

            Returns:
                What the code printed.
            """
            calls[0] += 1
            return env.call(self.state, "python", {"code": code})

    def reward(prompts, completions, ground_truth, **kw):
        finals = [next((m["content"] for m in reversed(c) if m["role"] == "assistant"), "") for c in completions]
        return [verify(f or "", gt) for f, gt in zip(finals, ground_truth)]

    points: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            points.append((time.perf_counter() - self.t0, state.global_step * args.batch_size))

    ds = load_dataset("json", data_files=str(data), split="train").remove_columns(["messages", "verifier"])
    config = GRPOConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                        num_generations=args.generations, generation_batch_size=args.batch_size,
                        max_completion_length=args.completion_length, max_tool_calling_iterations=args.max_turns - 1,
                        learning_rate=1e-6, beta=0.0, temperature=1.0, use_vllm=False, use_cpu=True, bf16=False,
                        gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=1,
                        disable_tqdm=True, loss_type="bnpo")
    tokenizer = load_tokenizer(model)
    chat.use_template(tokenizer, template())
    trainer = GRPOTrainer(model=load_model(model), reward_funcs=reward, args=config, train_dataset=ds,
                          processing_class=tokenizer, environment_factory=PythonTool, callbacks=[Clock()])
    trainer.train()
    return rate(points), calls[0] / (args.steps * args.batch_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="a local model or alias")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16, help="episodes per step")
    p.add_argument("--completion-length", type=int, default=256, help="tokens after the prompt per episode")
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    quiet()
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from posttrain.models import resolve

    model = resolve(args.model)
    got: dict[str, list[tuple[float, float]]] = {"posttrain": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prompts_file(tmp / "prompts.jsonl", 200)
        for i in range(args.rounds):
            got["posttrain"].append(run_posttrain(model, data, tmp / f"ours-{i}", args))
            print(f"round {i}: posttrain {got['posttrain'][-1][0]:.3f} episodes/s, "
                  f"{got['posttrain'][-1][1]:.2f} tool calls per episode", file=sys.stderr)
            got["trl"].append(run_trl(model, data, tmp / f"trl-{i}", args))
            print(f"round {i}: TRL {got['trl'][-1][0]:.3f} episodes/s, {got['trl'][-1][1]:.2f} tool calls per episode",
                  file=sys.stderr)
    med = {k: (statistics.median(s for s, _ in v), statistics.median(c for _, c in v)) for k, v in got.items()}
    print(json.dumps({"model": args.model, **{k: {"episodes_per_s": round(s, 3), "tool_calls": round(c, 2)}
                                              for k, (s, c) in med.items()}}))
    print(f"\nG={args.generations}, {args.batch_size} episodes/step, <= {args.max_turns} turns, "
          f"{args.completion_length} tokens/episode, {args.steps} steps")
    print("| model | posttrain episodes/s (tool calls/episode) | TRL episodes/s (tool calls/episode) | posttrain / TRL |")
    print("|---|---|---|---|")
    print(f"| {args.model} | {med['posttrain'][0]:.3f} ({med['posttrain'][1]:.2f}) | {med['trl'][0]:.3f} "
          f"({med['trl'][1]:.2f}) | {med['posttrain'][0] / med['trl'][0]:.2f}x |")


if __name__ == "__main__":
    main()
