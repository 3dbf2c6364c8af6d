"""``posttrain demo``: the main job on its embedded default, runnable on a laptop CPU in about a minute.

Builds a tiny Llama and tokenizer from scratch, fine-tunes it (SFT, packing, assistant-only loss) on
single-digit additions ("What is 3 + 4?" -> "7"), and reports greedy accuracy on the training
prompts and on held-out prompts that were never trained on, before and after SFT.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from posttrain.atomic import write_json
from posttrain.config import SFTConfig, load_config
from posttrain.data.synth.arithmetic import addition_problems, addition_record, split_problems
from posttrain.inference.engine import SamplingParams, TransformersEngine
from posttrain.models import build_tiny, load_model, load_tokenizer
from posttrain.train.loop import log
from posttrain.train.sft import run_sft


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
