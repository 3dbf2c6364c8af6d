"""Two CPU processes (gloo, through accelerate) give the loss curve of one process with the same global batch."""

import json
import os
import subprocess
import sys

from conftest import multi_turn_records, write_jsonl
from safetensors.torch import load_file


def test_two_processes_match_one(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", multi_turn_records(48))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\nchat_template: tulu\ndatasets:\n  - path: {data}\n"
                   "max_seq_length: 96\ngradient_accumulation_steps: 2\nlearning_rate: 1.0e-3\n"
                   "max_steps: 6\nsave_steps: 3\nlogging_steps: 1\npacking: true\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "posttrain.cli", "sft", "--config", str(cfg), f"output_dir={one}",
                    "per_device_train_batch_size=4"], check=True, env=env, capture_output=True, timeout=600)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "posttrain.cli", "sft", "--config", str(cfg), f"output_dir={two}",
                           "per_device_train_batch_size=2"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 8 (2 process(es) x 2 x 2 accumulation)" in proc.stderr
    curve = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = curve(one), curve(two)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3, 4, 5, 6]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-4 for x, y in zip(a, b)), (a, b)
    assert [x["trained_tokens"] for x in a] == [x["trained_tokens"] for x in b]
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-4
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    # DDP: each process holds the whole model, gradient and AdamW state, as one process does (FSDP halves
    # them: test_fsdp)
    alone = json.loads((one / "manifest.json").read_text())["metrics"]
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes"):
        assert manifest["metrics"][key] == alone[key] > 0


def test_a_token_budget_trains_the_same_tokens_on_two_processes(tmp_path, tiny_model_dir):
    """midtrain's total_tokens sets steps = ceil(total_tokens / max_seq_length) rows / global batch, with
    every process counted: 2 processes take half the steps of 1 and see the same number of tokens."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"What is {i} + {i % 7}? {i + i % 7}\n" for i in range(400)))
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndatasets:\n  - path: {corpus}\nmax_seq_length: 32\n"
                   "per_device_train_batch_size: 2\ntotal_tokens: 2048\nsave_steps: 0\nlearning_rate: 1.0e-3\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "posttrain.cli", "midtrain", "--config", str(cfg), f"output_dir={one}"],
                   check=True, env=env, capture_output=True, timeout=600)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "posttrain.cli",
                           "midtrain", "--config", str(cfg), f"output_dir={two}"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert (ma["steps"], mb["steps"]) == (32, 16)  # 2048 / 32 = 64 rows: 64 / 2 and 64 / (2 x 2)
    assert ma["metrics"]["num_input_tokens_seen"] == mb["metrics"]["num_input_tokens_seen"] == 2048
