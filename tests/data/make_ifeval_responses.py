"""Regenerate ifeval_smollm2_responses.jsonl: SmolLM2-135M-Instruct's greedy replies (up to 256 new
tokens, posttrain's engine, the model's own chat template) to the 271 prompts of the IFEval dev file.

    python tests/data/make_ifeval_responses.py    # about 15 minutes on 2 CPU cores

The file is the input of tests/test_agreement.py (ours against lm-evaluation-harness)."""

import json
from pathlib import Path

from posttrain.inference.engine import SamplingParams, TransformersEngine
from posttrain.models import load_model, load_tokenizer, resolve

HERE = Path(__file__).parent
SOURCE = HERE.parents[1] / "data" / "ifeval" / "ifeval_dev.jsonl"

if __name__ == "__main__":
    path = resolve("smollm2-135m-instruct")
    engine = TransformersEngine(load_model(path).eval(), load_tokenizer(path), batch_size=16)
    rows = [json.loads(line) for line in SOURCE.read_text().splitlines()]
    outs = engine.generate([[{"role": "user", "content": r["prompt"]}] for r in rows], SamplingParams(max_new_tokens=256))
    with open(HERE / "ifeval_smollm2_responses.jsonl", "w") as f:
        for r, o in zip(rows, outs):
            f.write(json.dumps({"key": r["key"], "prompt": r["prompt"], "response": o.text}) + "\n")
