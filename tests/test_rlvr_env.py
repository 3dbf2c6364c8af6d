"""Multi-turn RLVR (``env:``): an episode is one trajectory whose environment tokens get no gradient and
count in no denominator; checked against a reference computed token by token from plain forwards;
the gradient does not depend on the micro-batch split for every loss type; a run with an environment
resumes after kill -9 to the same weights, in turn and with the episodes played ahead (``async_steps``)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import mod2_task_files
from safetensors.torch import load_file
from test_envs import call

from posttrain.config import RLVRConfig
from posttrain.config_io import load_config
from posttrain.data import chat
from posttrain.envs import make_env
from posttrain.envs.rollout import run_episodes
from posttrain.inference.engine import Completion, SamplingParams
from posttrain.models import load_model, load_tokenizer
from posttrain.train import checkpoint
from posttrain.train.rlvr import completion_records, make_scorer, prepare_prompts

KILL_AFTER = os.path.join(os.path.dirname(__file__), "kill_after.py")


class Pooled:
    """An engine whose turn depends on the prompt's tokens: a tool call, or a right or wrong answer (so
    episodes differ in turns, length and reward), with seeded per-token log-probs."""

    def __init__(self, tokenizer):
        self.tokenizer, self.stop_ids = tokenizer, [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def generate(self, prompts, sampling):
        out, seen = [], {}
        for i, ids in enumerate(prompts):
            occurrence = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1  # the n episodes of a prompt differ
            key = sum(ids) * 31 + len(ids) + occurrence
            text = [call(f"print({key % 7} * 6)"), "#### 0", "#### 1", call("1/0")][key % 4]
            toks = self.tokenizer(text, add_special_tokens=False)["input_ids"] + self.stop_ids
            g = torch.Generator().manual_seed(key)
            out.append(Completion(text, toks, "stop", i, (-torch.rand(len(toks), generator=g)).tolist()))
        return out


@pytest.fixture(scope="module")
def mod2(tmp_path_factory):
    return mod2_task_files(tmp_path_factory.mktemp("mod2env"))


def episode_batch(mod2, **over):
    cfg = load_config(RLVRConfig, base={"model": mod2["sft"], "output_dir": "unused", "datasets": [{"path": str(mod2["train"])}],
                                        "num_generations": 4, "per_device_train_batch_size": 32, "env": "python",
                                        "max_prompt_length": 4000, "max_turns": 3, "max_episode_tokens": 400, **over})
    tok = load_tokenizer(cfg.model)
    chat.apply_template(tok, chat.CHATML)
    env = make_env("python")
    from posttrain.data.mixing import mix

    prompts, _ = prepare_prompts(tok, mix(cfg.datasets, "verifiable", 0)[0][:8], 4000, env)
    eps = run_episodes(Pooled(tok), env, [p["record"] for p in prompts], SamplingParams(max_new_tokens=200, n=4),
                       cfg.max_turns, cfg.max_episode_tokens)
    return cfg, tok, prompts, eps


def test_episodes_train_only_the_model_tokens(mod2, float64_llama):
    """GRPO's token_mean loss of a batch of episodes, through rows, prepare_advantages and the objective,
    against a reference from one plain forward per episode: ``-(1/M) Σ_i A_i Σ_{t model} ρ_it`` with ``M``
    the model tokens of the batch; gradients equal in float64."""
    from accelerate import Accelerator

    from posttrain.logprobs import TokenLogProbs
    from posttrain.train.loop import Run
    from posttrain.train.rl.prepare import prepare_advantages
    from posttrain.train.rl.rows import micro_batches
    from posttrain.train.rlvr import rl_objective

    cfg, tok, prompts, eps = episode_batch(mod2)
    assert {e.turns for e in eps} >= {1, 2} and any(0 in e.model_mask for e in eps)
    scores, sums = make_scorer(cfg, ["gsm8k"])(prompts, eps)
    assert sums["tool_calls"] > 0 and 0 < sums["verified"] < len(eps)
    model = load_model(cfg.model).double()
    module = TokenLogProbs(model)
    records = completion_records(prompts, eps)
    pad = tok.pad_token_id
    prepare_advantages(cfg, Run(Accelerator(cpu=True), module, model, tok, cfg), None, prompts, records, scores, pad)
    assert all(r["keep"] == [float(m) for m in r["model_mask"]] for r in records)
    with torch.no_grad():  # the old policy's log-probs: the model's own, so that every ratio is 1 at the start
        for r in records:
            ids = torch.tensor([prompts[r["prompt"]]["ids"] + r["token_ids"]])
            logits = model(ids).logits[0, :-1].log_softmax(-1)
            r["old_logp"] = logits[len(prompts[r["prompt"]]["ids"]) - 1:].gather(1, ids[0, len(prompts[r["prompt"]]["ids"]):, None]).squeeze(1).tolist()
    objective = rl_objective(cfg)
    batches = micro_batches(prompts, records, 32, "auto", pad, ("old_logp", "advantages", "keep"))
    n_items = sum(b[objective.items_key] for b in batches)
    assert n_items == sum(sum(e.model_mask) for e in eps)  # the denominator: model tokens only
    model.zero_grad()
    for b in batches:
        loss, _ = objective.loss(module, b, n_items)
        loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0.0
    for r in records:  # the reference: one plain forward per episode
        p = prompts[r["prompt"]]["ids"]
        ids = torch.tensor([p + r["token_ids"]])
        logp = model(ids).logits[0, :-1].log_softmax(-1)[len(p) - 1:].gather(1, ids[0, len(p):, None]).squeeze(1)
        # per-token fields travel as float32 in a batch (rows.collate_rows): the same rounding here
        old = torch.tensor(r["old_logp"], dtype=torch.float32).double()
        adv = float(torch.tensor(r["advantages"][0], dtype=torch.float32))
        ratio = torch.exp(logp - old)
        mask = torch.tensor(r["model_mask"], dtype=torch.float64)
        total = total - (ratio * adv * mask).sum() / n_items
    total.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 0
    assert max(float((got[n] - want[n]).abs().max()) for n in want) <= 1e-10 * scale


@pytest.mark.parametrize("algorithm,loss_type,advantage", [
    ("grpo", "token_mean", "group"), ("grpo", "sequence_mean", "rloo"), ("grpo", "dr_grpo", "group"),
    ("grpo", "gspo", "group"), ("grpo", "cispo", "reinforce_pp"), ("ppo", "token_mean", "group")])
def test_an_episode_batch_gives_the_same_gradient_for_any_split(mod2, float64_llama, algorithm, loss_type, advantage):
    """As test_rlvr's split test, on episodes (float64: splits agree to 1e-10 of the gradient's scale)."""
    from accelerate import Accelerator

    from posttrain.logprobs import TokenLogProbs
    from posttrain.train.loop import Run
    from posttrain.train.reward import PolicyAndValue, load_value_model
    from posttrain.train.rl.prepare import prepare_advantages
    from posttrain.train.rl.rows import micro_batches
    from posttrain.train.rlvr import rl_objective

    cfg, tok, prompts, eps = episode_batch(mod2, algorithm=algorithm, loss_type=loss_type, advantage=advantage)
    scores, _ = make_scorer(cfg, ["gsm8k"])(prompts, eps)
    model = load_model(cfg.model).double()
    module = TokenLogProbs(model)
    keys = ("old_logp", "advantages", "keep")
    if algorithm == "ppo":
        value = load_value_model(cfg.model, tok, "float32", 0, zero_head=False)
        value.model.double()
        module, keys = PolicyAndValue(module, value), keys + ("old_values", "returns")
    records = completion_records(prompts, eps)
    prepare_advantages(cfg, Run(Accelerator(cpu=True), module, model, tok, cfg), None, prompts, records, scores,
                       tok.pad_token_id)
    if algorithm == "ppo":  # advantages on model tokens only, GAE across the tool turns
        for r in records:
            assert all(a == 0.0 for a, m in zip(r["advantages"], r["model_mask"]) if not m)
        assert any(a != 0 for r in records for a, m in zip(r["advantages"], r["model_mask"]) if m)
    objective = rl_objective(cfg)
    grads = []
    for micro, share in ((32, "always"), (8, "never"), (12, "auto"), (5, "auto")):
        module.zero_grad()
        batches = micro_batches(prompts, records, micro, share, tok.pad_token_id, keys)
        n_items = sum(b[objective.items_key] for b in batches)
        for b in batches:
            loss, _ = objective.loss(module, b, n_items)
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    scale = max(float(g.abs().max()) for g in grads[0].values())
    assert scale > 0
    for other in grads[1:]:
        assert max(float((grads[0][k] - other[k]).abs().max()) for k in other) <= 1e-10 * scale


@pytest.mark.parametrize("ahead", [0, 1], ids=["in-turn", "async_steps=1"])
def test_a_run_with_an_environment_resumes_after_kill_9_to_the_same_weights(mod2, tmp_path, ahead):
    """With ``async_steps: 1`` the episodes are played by the worker process (its own environment) and
    the checkpoint holds the episodes generated ahead, masks included."""
    extra = "async_steps: 1\nvllm_importance_sampling_cap: 2.0\n" if ahead else ""

    def yaml(out):
        p = tmp_path / f"{out.name}.yaml"
        p.write_text(f"model: {mod2['sft']}\noutput_dir: {out}\ndatasets:\n  - path: {mod2['train']}\n{extra}"
                     "env: python\nenv_args: {timeout: 2}\nmax_turns: 2\nmax_episode_tokens: 24\nmax_prompt_length: 4000\n"
                     "max_completion_length: 8\nnum_generations: 4\nper_device_train_batch_size: 16\n"
                     "learning_rate: 1.0e-3\nmax_steps: 6\nsave_steps: 2\nseed: 3\nbeta: 0.05\n")
        return p

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = lambda cfg: [sys.executable, "-m", "posttrain.cli", "rlvr", "--config", str(cfg)]  # noqa: E731
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    done = subprocess.run(cmd(yaml(ref_dir)), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    killed = subprocess.run([sys.executable, KILL_AFTER, "4", "rlvr", "--config", str(yaml(run_dir))], env=env,
                            capture_output=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert int(checkpoint.latest(run_dir).name.split("-")[1]) == 4
    resumed = subprocess.run(cmd(yaml(run_dir)), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref, got = load_file(str(ref_dir / "model.safetensors")), load_file(str(run_dir / "model.safetensors"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    rows = [json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == [json.loads(x)["reward"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("turns" in r and "model_tokens" in r for r in rows)
    if ahead:
        assert {r["staleness"] for r in rows if r["step"] > 1} == {1}
