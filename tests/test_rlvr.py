"""RLVR: rollouts line up with the training forward, updates are exact under accumulation, GRPO
raises held-out accuracy, PPO raises the reward, a killed run resumes to the same weights, bad input
gets a clear error."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import mod2_prompt, mod2_task_files, write_jsonl
from safetensors.torch import load_file

from posttrain.config import DataSource, RLVRConfig
from posttrain.config_io import load_config
from posttrain.data.mixing import mix
from posttrain.errors import UserError
from posttrain.inference.engine import SamplingParams, TransformersEngine
from posttrain.models import load_model, load_tokenizer
from posttrain.train import checkpoint
from posttrain.train.rl.rows import micro_batches
from posttrain.train.rlvr import accuracy_fn, completion_records, make_scorer, prepare_prompts, run_rlvr

DATA = os.path.join(os.path.dirname(__file__), "..", "data")
KILL_AFTER = os.path.join(os.path.dirname(__file__), "kill_after.py")


@pytest.fixture(scope="session")
def mod2_task(tmp_path_factory) -> dict:
    return mod2_task_files(tmp_path_factory.mktemp("mod2"))


def rl_config(task, out, **over) -> RLVRConfig:
    base = {"model": task["sft"], "output_dir": str(out), "datasets": [{"path": str(task["train"])}],
            "max_completion_length": 4, "num_generations": 8, "per_device_train_batch_size": 64,
            "learning_rate": 1e-3, "max_steps": 20, "save_steps": 0, "seed": 0}
    return load_config(RLVRConfig, base={**base, **over})


def heldout_accuracy(task, model_dir) -> float:
    tok = load_tokenizer(model_dir)
    held, _ = prepare_prompts(tok, mix([DataSource(path=str(task["heldout"]))], "verifiable", 0)[0], 512)
    return accuracy_fn(held, tok, rl_config(task, "unused"))(load_model(model_dir))["accuracy"]


def documented_metrics() -> set[str]:
    """The metric names docs/rlvr.md lists (``verifier/NAME`` stands for each verifier's name)."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "rlvr.md")).read()
    block = text.split("<!-- metrics: rlvr")[1].split("\n\n")[0]
    names = set(re.findall(r"`([a-z_/A-Z]+)`", block))
    return {n.replace("NAME", "gsm8k") for n in names}


def rollout_batch(task, n_prompts=8):
    cfg = rl_config(task, "unused")
    tok = load_tokenizer(cfg.model)
    prompts, _ = prepare_prompts(tok, mix(cfg.datasets, "verifiable", 0)[0], 512)
    model = load_model(cfg.model)
    engine = TransformersEngine(model, tok, batch_size=64)
    mine = prompts[:n_prompts]
    comps = engine.generate([p["ids"] for p in mine], SamplingParams(max_new_tokens=4, temperature=1.0, n=8, seed=3))
    return cfg, tok, model, engine, mine, comps


@pytest.mark.parametrize("share", ["always", "never"])
def test_rollout_logprobs_line_up_with_the_training_forward(mod2_task, share):
    from posttrain.logprobs import TokenLogProbs
    from posttrain.train.rl.rows import model_inputs

    cfg, tok, model, engine, mine, comps = rollout_batch(mod2_task)
    assert all(c.token_ids[-1] in engine.stop_ids for c in comps if c.finish_reason == "stop")
    records = completion_records(mine, comps)
    (batch,) = micro_batches(mine, records, 64, share, engine.pad_id, ("old_logp",))
    assert batch["input_ids"].shape[0] == (8 if share == "always" else 64) and batch["num_sequences"] == 64
    with torch.no_grad():
        logp = TokenLogProbs(model)(*model_inputs(batch, "cpu"))
    sel = batch["labels"][:, 1:] != -100
    assert int(sel.sum()) == batch["num_tokens"] == sum(len(c.token_ids) for c in comps)
    assert float((logp - batch["old_logp"])[sel].abs().max()) <= 1e-4


def test_a_shared_prompt_row_gives_the_gradients_of_separate_rows(mod2_task, float64_llama):
    """In float64 (see float64_llama) a row ``P C1..CG`` gives the log-probs and gradients of the G
    separate rows ``P Ci`` to rounding error (1e-12 of their scale; float64's u is 1.1e-16)."""
    from posttrain.logprobs import TokenLogProbs
    from posttrain.train.rl.rows import model_inputs

    cfg, tok, _, engine, mine, comps = rollout_batch(mod2_task, n_prompts=4)
    model = load_model(cfg.model).double()
    records = completion_records(mine, comps)
    results = []
    for share in ("always", "never"):
        model.zero_grad()
        (batch,) = micro_batches(mine, records, 64, share, engine.pad_id, ("old_logp",))
        assert batch["input_ids"].shape[0] == (4 if share == "always" else 32)
        logp = TokenLogProbs(model)(*model_inputs(batch, "cpu"))
        sel = batch["labels"][:, 1:] != -100
        values = logp[sel]
        (values * torch.linspace(-1, 1, values.numel(), dtype=torch.float64)).sum().backward()
        results.append((values.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    assert float((a - b).abs().max()) <= 1e-12 * float(a.abs().max())
    scale = max(float(g.abs().max()) for g in ga.values())
    assert max(float((ga[n] - gb[n]).abs().max()) for n in ga) <= 1e-12 * scale


@pytest.mark.parametrize("algorithm,loss_type,advantage", [
    ("grpo", "token_mean", "group"), ("grpo", "sequence_mean", "group"), ("grpo", "dr_grpo", "group"),
    ("grpo", "dapo", "rloo"), ("grpo", "gspo", "group"), ("grpo", "cispo", "reinforce_pp"), ("ppo", "token_mean", "group")])
def test_the_gradient_of_a_step_is_the_same_for_any_micro_batch_split(mod2_task, float64_llama, algorithm, loss_type,
                                                                       advantage):
    """The loop's contract for RL: each micro-batch's loss is divided once by the global count
    (grpo.COUNTS), so the summed gradient does not depend on how completions are split into
    micro-batches or rows. In float64 the splits agree to rounding error: about 10^3 terms per sum at
    u = 1.1e-16 bound the difference by ~1e-13 of the gradient's scale; 1e-10 leaves room for the
    matmul and attention reductions and is still 10^3 below float32's rounding (a wrong denominator
    is off by a factor of order 1)."""
    from accelerate import Accelerator

    from posttrain.logprobs import TokenLogProbs
    from posttrain.train.loop import Run
    from posttrain.train.reward import PolicyAndValue, load_value_model
    from posttrain.train.rl.prepare import prepare_advantages
    from posttrain.train.rlvr import rl_objective

    _, tok, _, engine, mine, comps = rollout_batch(mod2_task)
    cfg = rl_config(mod2_task, "unused", algorithm=algorithm, loss_type=loss_type, advantage=advantage, beta=0.0,
                    mask_truncated=loss_type == "dapo")
    scores, _ = make_scorer(cfg, ["gsm8k"])(mine, comps)
    model = load_model(cfg.model).double()
    module = TokenLogProbs(model)
    keys = ("old_logp", "advantages")
    if algorithm == "ppo":
        value = load_value_model(cfg.model, tok, "float32", 0, zero_head=False)
        value.model.double()
        module, keys = PolicyAndValue(module, value), keys + ("old_values", "returns")
    objective = rl_objective(cfg)
    records = completion_records(mine, comps)
    if cfg.mask_truncated:  # completions marked truncated are out of the loss (and of its count)
        for r in records[::3]:
            r["truncated"] = True
        keys += ("keep",)
    prepare_advantages(cfg, Run(Accelerator(cpu=True), module, model, tok, cfg), None, mine, records, scores, engine.pad_id)
    grads = []
    for micro, share in ((64, "always"), (16, "never"), (24, "auto"), (5, "auto")):
        module.zero_grad()
        batches = micro_batches(mine, records, micro, share, engine.pad_id, keys)
        n_items = sum(b[objective.items_key] for b in batches)
        for batch in batches:
            loss, _ = objective.loss(module, batch, n_items)
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    scale = max(float(g.abs().max()) for g in grads[0].values())
    assert scale > 0
    for other in grads[1:]:
        assert set(other) == set(grads[0])
        assert max(float((grads[0][k] - other[k]).abs().max()) for k in other) <= 1e-10 * scale


def test_grpo_raises_heldout_accuracy_by_15_points(mod2_task, tmp_path):
    """240 steps: measured on a CPU with AMX, 120 steps left 2 of 4 seeds (0 and 1) at the starting
    0.43 (the others reached 0.88); with 240, seeds 0-5 all reached 0.87-0.88."""
    before = heldout_accuracy(mod2_task, mod2_task["sft"])
    res = run_rlvr(rl_config(mod2_task, tmp_path / "grpo", max_steps=240,
                             eval_datasets=[{"path": str(mod2_task["heldout"])}]))
    after = res.metrics["eval/accuracy"]
    assert after == heldout_accuracy(mod2_task, str(tmp_path / "grpo"))
    assert after >= before + 0.15, (before, after)
    manifest = json.loads((tmp_path / "grpo" / "manifest.json").read_text())
    assert manifest["stage"] == "rlvr" and manifest["data_stats"]["verifiers"] == {"gsm8k": 300}
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert {"grad_norm", "tokens_per_second", "verifier/gsm8k"} <= set().union(*rows) <= documented_metrics()


# The mod-2 task is learnt or not, abruptly: at 64 completions a step one run may flip to the parity
# rule and another stay on a constant answer (0.43 or 0.57) for 300 steps. At 128 completions a step
# every variant below reached 0.88 (dynamic sampling 1.0) in 150 steps here, 3 seeds of the default.
# Rollouts one step stale did not learn at lr 1e-3 (0.43 after 150 steps, 3 seeds); at 5e-4 they
# reached 0.86, 0.79, 0.88 (synchronous at 5e-4: 0.89).
VARIANTS = {"dapo": {"loss_type": "dapo"}, "gspo": {"loss_type": "gspo"}, "cispo": {"loss_type": "cispo"},
            "rloo": {"advantage": "rloo"}, "reinforce_pp": {"advantage": "reinforce_pp"},
            "dynamic_sampling+overlong+mask_truncated": {"dynamic_sampling": True, "overlong_buffer": 2,
                                                          "overlong_penalty": 0.2, "mask_truncated": True},
            "async_steps=1": {"async_steps": 1, "vllm_importance_sampling_cap": 2.0, "learning_rate": 5e-4}}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_raises_heldout_accuracy(mod2_task, tmp_path, name):
    """The held-out gain of test_grpo_raises_heldout_accuracy_by_15_points, for each loss type,
    advantage, sampling option and for rollouts generated one step ahead by a second process."""
    before = heldout_accuracy(mod2_task, mod2_task["sft"])
    res = run_rlvr(rl_config(mod2_task, tmp_path / "run", max_steps=150, per_device_train_batch_size=128,
                             **VARIANTS[name],
                             eval_datasets=[{"path": str(mod2_task["heldout"])}]))
    assert res.metrics["eval/accuracy"] >= before + 0.15, (before, res.metrics["eval/accuracy"])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set().union(*rows) <= documented_metrics()
    if name.startswith("dynamic"):
        assert {"sampled_prompts", "zero_variance_fill", "overlong"} <= set(rows[0])
        steps = [r for r in rows if "reward" in r]  # (the last line is the final evaluation)
        assert sum(r["sampled_prompts"] for r in steps) > 16 * len(steps)  # more prompts drawn where groups agreed
    if name.startswith("async"):
        steps = [r for r in rows if "reward" in r]
        assert {r["staleness"] for r in steps if r["step"] > 1} == {1}
        assert all(r["engine_logprob_abs_diff"] > 0 for r in steps[1:])  # the worker's weights are a step old
        hidden = 1 - sum(r["async_wait_seconds"] for r in steps[1:]) / sum(r["generate_seconds"] for r in steps[1:])
        assert hidden > 0.5, hidden  # generation overlapped training: measured 0.72 of it hidden


def test_ppo_raises_the_reward_and_saves_its_value_model(mod2_task, tmp_path):
    res = run_rlvr(rl_config(mod2_task, tmp_path / "ppo", algorithm="ppo", max_steps=150, beta=0.05, num_iterations=2,
                             unfinished_penalty=1.0))
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[-25:]) / 25 > sum(rewards[:25]) / 25 + 0.2, rewards
    assert all("value_loss" in r and "kl" in r for r in rows)
    assert set().union(*rows) <= documented_metrics()  # docs/rlvr.md lists every key a run logs
    assert (tmp_path / "ppo" / "value" / "config.json").is_file() and res.metrics["step"] == 150


def test_same_seed_same_weights(mod2_task, tmp_path):
    a = run_rlvr(rl_config(mod2_task, tmp_path / "a", max_steps=5)).output_dir
    b = run_rlvr(rl_config(mod2_task, tmp_path / "b", max_steps=5)).output_dir
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    start = load_file(os.path.join(mod2_task["sft"], "model.safetensors"))
    assert [k for k in wa if torch.equal(wa[k], start[k])] == []  # and training moved every parameter


@pytest.mark.parametrize("algorithm", ["grpo", "ppo", "grpo-async"])
def test_sigkill_and_resume_gives_identical_weights(mod2_task, tmp_path, algorithm):
    """With ``async_steps: 1`` the checkpoint holds the rollouts generated ahead, so the resumed run
    trains on what the uninterrupted one did."""
    extra = "async_steps: 1\nvllm_importance_sampling_cap: 2.0\n" if algorithm.endswith("async") else ""

    def yaml(out):
        p = tmp_path / f"{out.name}.yaml"
        p.write_text(f"model: {mod2_task['sft']}\noutput_dir: {out}\nalgorithm: {algorithm[:4]}\n{extra}datasets:\n"
                     f"  - path: {mod2_task['train']}\nmax_completion_length: 4\nnum_generations: 8\n"
                     "per_device_train_batch_size: 32\ngradient_accumulation_steps: 2\nlearning_rate: 1.0e-3\n"
                     "max_steps: 40\nsave_steps: 10\nsave_total_limit: 2\nbeta: 0.05\nnum_iterations: 2\n"
                     "lr_scheduler_type: cosine\nwarmup_ratio: 0.1\nseed: 3\n")
        return p

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = lambda cfg: [sys.executable, "-m", "posttrain.cli", "rlvr", "--config", str(cfg)]  # noqa: E731
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    subprocess.run(cmd(yaml(ref_dir)), check=True, env=env, capture_output=True, timeout=600)
    killed = subprocess.run([sys.executable, KILL_AFTER, "20", "rlvr", "--config", str(yaml(run_dir))], env=env,
                            capture_output=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]  # right after checkpoint 20 was written
    assert not (run_dir / "manifest.json").exists()
    killed_at = int(checkpoint.latest(run_dir).name.split("-")[1])
    assert killed_at == 20
    resumed = subprocess.run(cmd(yaml(run_dir)), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint-{killed_at}" in resumed.stderr
    for name in ["model.safetensors"] + (["value/model.safetensors"] if algorithm == "ppo" else []):
        ref, got = load_file(str(ref_dir / name)), load_file(str(run_dir / name))
        assert max(float((ref[k] - got[k]).abs().max()) for k in ref) <= 1e-6, name
    ref_rows = (ref_dir / "metrics.jsonl").read_text().splitlines()
    got_rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["reward"] for x in ref_rows] == [json.loads(x)["reward"] for x in got_rows]


def test_bad_input_gets_clear_errors(mod2_task, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [mod2_prompt(5), {**mod2_prompt(6), "verifier": "gsm9k"}])
    with pytest.raises(UserError, match=r"bad.jsonl record 1: field 'verifier': unknown verifier 'gsm9k'"):
        run_rlvr(rl_config(mod2_task, tmp_path / "x", datasets=[{"path": str(bad)}]))
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "verifier": "gsm8k"}])
    with pytest.raises(UserError, match=r"missing.jsonl:1: field 'ground_truth' is missing"):
        run_rlvr(rl_config(mod2_task, tmp_path / "x", datasets=[{"path": str(missing)}]))
    with pytest.raises(UserError, match="multiple of num_generations"):
        rl_config(mod2_task, tmp_path / "x", per_device_train_batch_size=12)
    with pytest.raises(UserError, match="num_generations >= 2"):
        rl_config(mod2_task, tmp_path / "x", num_generations=1, per_device_train_batch_size=4)
    with pytest.raises(UserError, match="async_steps is supported for grpo without dynamic_sampling"):
        rl_config(mod2_task, tmp_path / "x", async_steps=1, dynamic_sampling=True)
    with pytest.raises(UserError, match="'vllm_importance_sampling_cap' needs engine: vllm or async_steps > 0"):
        rl_config(mod2_task, tmp_path / "x", vllm_importance_sampling_cap=2.0)
    with pytest.raises(UserError, match="'overlong_buffer' \\(8\\) must be at most max_completion_length \\(4\\)"):
        rl_config(mod2_task, tmp_path / "x", overlong_buffer=8)


@pytest.mark.parametrize("path,verifier,n", [("math/math500_dev.jsonl", "math", 250), ("ifeval/ifeval_dev.jsonl", "ifeval", 271),
                                             ("humaneval/HumanEval.jsonl.gz", "code", 164),
                                             ("gsm8k/train.jsonl", "gsm8k", 7473)])
def test_public_files_load_as_verifiable_prompts(path, verifier, n):
    from posttrain.rewards import get_verifier

    recs, _ = mix([DataSource(path=os.path.join(DATA, path))], "verifiable", 0)
    assert len(recs) == n and {r["verifier"] for r in recs} == {verifier}
    first = recs[0]
    if verifier == "math":  # the reference answer verifies against itself
        assert get_verifier("math")(f"\\boxed{{{first['ground_truth']}}}", first["ground_truth"]) == 1.0
    if verifier == "code":  # the canonical solution passes through the adapter's ground truth
        import gzip

        raw = json.loads(gzip.open(os.path.join(DATA, path), "rt").readline())
        assert get_verifier("code")(raw["canonical_solution"], first["ground_truth"]) == 1.0
    if verifier == "ifeval":
        assert set(first["ground_truth"]) == {"instruction_id_list", "kwargs"}


@pytest.mark.parametrize("algorithm", ["grpo", "ppo", "grpo-gspo-reinforce_pp"])
def test_two_processes_train_as_one(mod2_task, tmp_path, algorithm):
    """torchrun with 2 CPU processes (gloo) and 1 process with the same global batch (2 x 16 x 2 = 1 x 32
    x 2): each process samples whole groups from per-prompt streams, so both runs sample the same
    completions; the loss is normalised by the global batch (REINFORCE++'s statistics are summed over
    the processes), so the updates agree. Compared per step:
    rewards and completion lengths exactly; the gradient norm (after DDP's all-reduce) to float32
    summation error: about 500 completion tokens per step at u = 6e-8 bound it by 3e-5 relative, and
    later steps start from weights that differ by that much (a per-process normalisation would be off
    by a factor of order 1)."""
    def config(name, batch):
        cfg = tmp_path / f"{name}.yaml"
        extra = "loss_type: gspo\nadvantage: reinforce_pp\n" if "gspo" in algorithm else ""
        cfg.write_text(f"model: {mod2_task['sft']}\nalgorithm: {algorithm[:4]}\n{extra}datasets:\n  - path: {mod2_task['train']}\n"
                       f"max_completion_length: 4\nnum_generations: 8\nper_device_train_batch_size: {batch}\n"
                       "gradient_accumulation_steps: 2\nlearning_rate: 1.0e-3\nmax_steps: 3\nsave_steps: 2\nbeta: 0.05\n"
                       f"output_dir: {tmp_path / name}\n")
        return str(cfg)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "posttrain.cli",
                          "rlvr", "--config", config("two", 16)], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "8 per step x 8 generations" in two.stderr and "2 process(es)" in two.stderr
    one = subprocess.run([sys.executable, "-m", "posttrain.cli", "rlvr", "--config", config("one", 32)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")}
    assert [r["step"] for r in rows["two"]] == [1, 2, 3]
    for a, b in zip(rows["one"], rows["two"]):
        assert (a["reward"], a["verified"], a["completion_tokens"]) == (b["reward"], b["verified"], b["completion_tokens"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 3e-5 * a["grad_norm"], (a["grad_norm"], b["grad_norm"])
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["world_size"] == 2
    assert (tmp_path / "two" / "model.safetensors").is_file()
