"""A run killed with SIGKILL resumes from its last complete checkpoint to the same final weights,
for every training stage (SFT, DPO, reward model)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import multi_turn_records, write_jsonl
from safetensors.torch import load_file

from posttrain.train import checkpoint

COMMON = ("per_device_train_batch_size: 4\ngradient_accumulation_steps: 2\nlr_scheduler_type: cosine\n"
          "warmup_ratio: 0.1\nmax_steps: 120\nsave_steps: 20\nsave_total_limit: 2\nlogging_steps: 1\nseed: 5\n")


def _config(tmp_path, stage, model, data, out):
    extra = {"sft": "max_seq_length: 96\nlearning_rate: 1.0e-3\n",
             "dpo": "max_seq_length: 64\nlearning_rate: 1.0e-3\nloss_type: dpo_norm\nbeta: 5\n",
             "reward": "max_seq_length: 64\nlearning_rate: 1.0e-3\n"}[stage]
    p = tmp_path / f"{out.name}.yaml"
    p.write_text(f"model: {model}\noutput_dir: {out}\nchat_template: tulu\ndatasets:\n  - path: {data}\n"
                 + extra + COMMON)
    return p


KILL_AFTER = os.path.join(os.path.dirname(__file__), "kill_after.py")


def _cmd(stage, cfg):
    return [sys.executable, "-m", "posttrain.cli", stage, "--config", str(cfg)]


# DPO and reward models resume through the same loop as SFT (RowSource): CI kills SFT here and RLVR in
# test_rlvr.py; `pytest -m slow` kills the other two as well.
@pytest.mark.parametrize("stage", ["sft", pytest.param("dpo", marks=pytest.mark.slow),
                                   pytest.param("reward", marks=pytest.mark.slow)])
def test_sigkill_and_resume_gives_identical_weights(stage, tmp_path, tiny_model_dir, parity_task):
    if stage == "sft":
        model, data = tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", multi_turn_records(40))
    else:
        model, data = parity_task["sft"], parity_task["train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POSTTRAIN_CACHE": str(tmp_path / "cache")}
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cmd(stage, _config(tmp_path, stage, model, data, ref_dir)), check=True, env=env,
                   capture_output=True, timeout=600)

    cfg = _config(tmp_path, stage, model, data, run_dir)
    killed = subprocess.run([sys.executable, KILL_AFTER, "40", *_cmd(stage, cfg)[3:]], env=env, capture_output=True,
                            timeout=600)  # SIGKILLed right after checkpoint 40 is in place
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run_dir / "manifest.json").exists()
    killed_at = int(checkpoint.latest(run_dir).name.split("-")[1])
    assert killed_at == 40
    # debris a crash can leave: a half-written temporary checkpoint and a directory with no state file
    (run_dir / "checkpoints" / ".tmp-checkpoint-999-x").mkdir()
    (run_dir / "checkpoints" / "checkpoint-998").mkdir()
    (run_dir / "checkpoints" / "checkpoint-998" / "optimizer.pt").write_bytes(b"partial")

    resumed = subprocess.run(_cmd(stage, cfg), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {run_dir / 'checkpoints' / f'checkpoint-{killed_at}'}" in resumed.stderr

    ref, got = load_file(str(ref_dir / "model.safetensors")), load_file(str(run_dir / "model.safetensors"))
    assert ref.keys() == got.keys()
    assert max(float((ref[k] - got[k]).abs().max()) for k in ref) <= 1e-6
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 121))
    ref_loss = [json.loads(x)["loss"] for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    got_loss = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert torch.allclose(torch.tensor(ref_loss), torch.tensor(got_loss), atol=1e-6)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["resumed_from"].endswith(f"checkpoint-{killed_at}") and manifest["stage"] == stage


def test_publish_dir_swaps_in_one_step_and_a_torn_metrics_line_is_dropped(tmp_path):
    import json as _json

    from posttrain.atomic import publish_dir, read_jsonl_appended
    from posttrain.train.checkpoint import trim_metrics

    final, new = tmp_path / "final", tmp_path / ".tmp-final"
    final.mkdir()
    (final / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    publish_dir(new, final)
    assert (final / "a").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(_json.dumps({"step": 1}) + "\n" + _json.dumps({"step": 2}) + "\n" + '{"step": 3, "lo')
    assert read_jsonl_appended(metrics) == [{"step": 1}, {"step": 2}]
    trim_metrics(metrics, 2)
    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n'
    metrics.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    from posttrain.errors import UserError

    with pytest.raises(UserError, match="metrics.jsonl:2"):
        read_jsonl_appended(metrics)
