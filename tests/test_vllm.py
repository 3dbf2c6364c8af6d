"""vLLM behind the engine interface (the optional extra; these tests run where vLLM is installed, as
in CI's second step: `pytest -m vllm`). One engine per model for the whole module: an engine takes
tens of seconds to start on a CPU. vLLM's CPU attention needs head_dim 32/64/128: the tiny model here
has hidden size 128 and 2 heads (head_dim 64)."""

import json

import pytest
import torch
from conftest import mod2_task_files, thinker_model, thinking_records
from test_rlvr import documented_metrics, heldout_accuracy

from posttrain.config_io import load_config
from posttrain.inference import budget_forcing
from posttrain.inference.engine import SamplingParams, TransformersEngine
from posttrain.logprobs import TokenLogProbs
from posttrain.models import load_model, load_tokenizer

pytestmark = pytest.mark.vllm
try:  # the engine's own import: its environment defaults first (in-process engine core, KV cache size)
    from posttrain.errors import UserError
    from posttrain.inference.vllm_engine import import_vllm

    import_vllm()
except UserError:
    pytest.skip("vLLM is not installed (the optional extra; CI installs it for `pytest -m vllm`)", allow_module_level=True)


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    """A tiny Llama (head_dim 64) SFT'd to think briefly then answer, and both engines on it."""
    from posttrain.inference.vllm_engine import VLLMEngine

    path = thinker_model(tmp_path_factory.mktemp("vllm-think"), hidden_size=128, num_heads=2, num_kv_heads=2)
    local = TransformersEngine(load_model(path), load_tokenizer(path), batch_size=16)
    return {"path": path, "local": local, "vllm": VLLMEngine(path, seed=0),
            "prompts": [r["messages"][:1] for r in thinking_records()[::7]]}


def test_episodes_on_vllm_match_the_transformers_engine(thinker):
    """Multi-turn episodes (posttrain.envs.rollout) on vLLM: the same token sequences and masks as the
    transformers engine's on >= 90% of greedy episodes of the python environment."""
    from posttrain.envs import make_env
    from posttrain.envs.rollout import run_episodes

    env = make_env("python")
    records = [{"messages": p} for p in thinker["prompts"]]
    sampling = SamplingParams(max_new_tokens=24)
    ours = run_episodes(thinker["local"], env, records, sampling, max_turns=2, max_tokens=64)
    theirs = run_episodes(thinker["vllm"], env, records, sampling, max_turns=2, max_tokens=64)
    same = [(a.token_ids, a.model_mask) == (b.token_ids, b.model_mask) for a, b in zip(ours, theirs)]
    assert len(same) == len(records) and sum(same) >= 0.9 * len(same), [(a.text, b.text) for a, b in zip(ours, theirs)]


def test_greedy_text_and_logprobs_agree_with_the_transformers_engine(thinker):
    sampling = SamplingParams(max_new_tokens=24)
    ours = thinker["local"].generate(thinker["prompts"], sampling)
    theirs = thinker["vllm"].generate(thinker["prompts"], sampling)
    same = [a.token_ids == b.token_ids for a, b in zip(ours, theirs)]
    assert sum(same) >= 0.9 * len(same), [(a.text, b.text) for a, b in zip(ours, theirs)]
    for a, b, eq in zip(ours, theirs, same):
        assert b.prompt_index == a.prompt_index and b.finish_reason == a.finish_reason
        if eq:
            assert a.text == b.text
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-3


def test_sampling_is_per_completion_and_logprobs_are_at_the_temperature(thinker):
    engine, prompts = thinker["vllm"], thinker["prompts"][:4]
    sampling = SamplingParams(max_new_tokens=8, temperature=1.3, n=3, seed=4)
    together = engine.generate(prompts, sampling)
    alone = [c for p in prompts for c in engine.generate([p], sampling)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.prompt_index for c in together] == [i for i in range(4) for _ in range(3)]
    model = thinker["local"].model
    for c in together:
        prompt = engine.encode(prompts[c.prompt_index])
        with torch.no_grad():
            logits = model(torch.tensor([prompt + c.token_ids])).logits[0].float() / 1.3
        want = [float(torch.log_softmax(logits[len(prompt) - 1 + k], -1)[t]) for k, t in enumerate(c.token_ids)]
        assert max(abs(x - y) for x, y in zip(c.logprobs, want)) <= 1e-3


def test_sampled_batches_larger_than_a_scheduler_step_work_and_do_not_depend_on_the_batch(thinker):
    """128 seeded completions of ~120-token prompts: more prompt tokens than one scheduler step takes
    (with chunked prefill, vLLM 0.32's CPU runner failed here: "CPU Generator does not use offset")."""
    engine = thinker["vllm"]
    prompts = [[{"role": "user", "content": " ".join(r["messages"][0]["content"] for r in thinking_records()[k:k + 12])}]
               for k in range(16)]
    assert min(len(engine.encode(p)) for p in prompts) > 100
    sampling = SamplingParams(max_new_tokens=4, temperature=1.0, n=8, seed=1)
    together = engine.generate(prompts, sampling)
    assert len(together) == 128
    assert [c.token_ids for c in together[:8]] == [c.token_ids for c in engine.generate(prompts[:1], sampling)]


def test_budget_forcing_gives_the_same_token_counts_as_the_transformers_engine(thinker):
    for bf, max_new in ((budget_forcing.BudgetForcing(think_start=""), 40),
                        (budget_forcing.BudgetForcing(think_start="", max_thinking_tokens=3), 40),
                        (budget_forcing.BudgetForcing(think_start="", num_wait=2), 40),
                        (budget_forcing.BudgetForcing(think_start="", min_thinking_tokens=25, max_thinking_tokens=30), 40)):
        sampling = SamplingParams(max_new_tokens=max_new)
        ours = budget_forcing.generate(thinker["local"], thinker["prompts"], bf, sampling)
        theirs = budget_forcing.generate(thinker["vllm"], thinker["prompts"], bf, sampling)
        assert [f.thinking_tokens for f in theirs] == [f.thinking_tokens for f in ours], bf
        assert [f.waits for f in theirs] == [f.waits for f in ours] and [f.forced_stop for f in theirs] == [
            f.forced_stop for f in ours]


def logprob_gap(engine, model, prompts, completion) -> float:
    """The largest gap between the engine's log-probs of its completion and our forward's."""
    prompt = engine.encode(prompts[completion.prompt_index])
    ids = torch.tensor([prompt + completion.token_ids])
    labels = ids.clone()
    labels[:, :len(prompt)] = -100
    with torch.no_grad():
        logp = TokenLogProbs(model)(ids, torch.arange(ids.shape[1])[None], labels)[0, len(prompt) - 1:]
    return max(abs(x - y) for x, y in zip(completion.logprobs, logp.tolist()))


def test_a_weight_push_reaches_the_engine(thinker):
    """Change the weights, push them (no checkpoint written): vLLM's log-probs of its own greedy
    completions equal the changed model's forward; push the originals back: the old outputs return."""
    engine, prompts = thinker["vllm"], thinker["prompts"][:6]
    before = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    model = load_model(thinker["path"])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.load_weights(model)
    after = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    assert [a.token_ids for a in after] != [b.token_ids for b in before]
    tok = thinker["local"].tokenizer
    for c in after:
        assert logprob_gap(engine, model, prompts, c) <= 1e-3, tok.decode(c.token_ids)
    engine.load_weights(load_model(thinker["path"]))
    again = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    assert [a.token_ids for a in again] == [b.token_ids for b in before]


@pytest.fixture(scope="module")
def mod2(tmp_path_factory):
    """The RLVR test's tiny task (test_rlvr.py) with a head_dim-64 model."""
    root = tmp_path_factory.mktemp("vllm-mod2")
    task = mod2_task_files(root, hidden_size=128, num_heads=2, num_kv_heads=2)
    base = {"model": task["sft"], "datasets": [{"path": str(task["train"])}], "max_completion_length": 4,
            "num_generations": 8, "per_device_train_batch_size": 64, "learning_rate": 1e-3, "save_steps": 0,
            "decontaminate_against": []}
    return {**task, "root": root, "base": base}


def rlvr(mod2, out, **overrides):
    from posttrain.config import RLVRConfig
    from posttrain.train.rlvr import run_rlvr

    return run_rlvr(load_config(RLVRConfig, base={**mod2["base"], "output_dir": str(out), **overrides}))


def metrics_rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]


def test_rlvr_with_an_environment_on_vllm(mod2):
    """``env: python`` with ``engine: vllm`` (in this process): episodes sampled by vLLM after each weight
    push, the trainer's recomputed log-probs agreeing with vLLM's on the model's tokens."""
    out = mod2["root"] / "vllm-env"
    rlvr(mod2, out, max_steps=2, seed=0, engine="vllm", env="python", env_args={"timeout": 2}, max_prompt_length=4000,
         max_turns=2, max_episode_tokens=16)
    rows = metrics_rows(out)
    assert len(rows) == 2 and all(r["turns"] >= 1 and r["model_tokens"] > 0 for r in rows)
    assert all(r["engine_logprob_abs_diff"] < 1e-3 for r in rows), rows


def test_grpo_with_vllm_rollouts_gains_as_much_as_with_the_transformers_engine(mod2):
    """100 GRPO steps, 3 seeds, each engine: the held-out gain with vLLM rollouts (weights pushed every
    step, old log-probs recomputed by the trainer, truncated importance sampling on) is the
    transformers engine's or more. Measured here: base 0.47; transformers 0.59 / 0.71 / 0.43, vLLM 0.61 /
    0.78 / 0.55 (means 0.58 and 0.65). Every step's vLLM log-probs equal the trainer's."""
    base = heldout_accuracy(mod2, mod2["sft"])
    final = {}
    for engine in ("transformers", "vllm"):
        extra = {"engine": "vllm", "vllm_importance_sampling_cap": 2.0} if engine == "vllm" else {}
        for seed in (0, 1, 2):
            out = mod2["root"] / f"grpo-{engine}-{seed}"
            res = rlvr(mod2, out, max_steps=100, seed=seed, eval_datasets=[{"path": str(mod2["heldout"])}],
                       eval_steps=1000, **extra)
            final[engine, seed] = res.metrics["eval/accuracy"]
            if engine == "vllm":
                rows = metrics_rows(out)
                assert len(rows) == 100 and all("weight_push_seconds" in r for r in rows)
                assert all(r["engine_logprob_abs_diff"] <= 1e-3 and r["engine_logprob_max_ratio"] <= 1.01
                           and r["importance_sampling_capped"] == 0.0 for r in rows)
                assert set().union(*rows) <= documented_metrics()  # docs/rlvr.md lists every key
    mean = {e: sum(final[e, s] for s in (0, 1, 2)) / 3 for e in ("transformers", "vllm")}
    assert mean["transformers"] >= base + 0.05, (base, final)
    assert mean["vllm"] >= mean["transformers"] - 0.03, (base, final)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_KEY = "vllm-test-server-key"  # the servers' API key; the test sets it for the client too


def start_server(model: str, core: int):
    """``posttrain serve --engine vllm --accept-weights`` in its own process, bound to one core, with
    ``SERVER_KEY``."""
    import os
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": str(core), "POSTTRAIN_API_KEY": SERVER_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve", "--model", model, "--engine", "vllm",
                             "--accept-weights", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(servers, timeout=300.0):
    import time

    from posttrain.inference.vllm_servers import ServerFailed, call

    deadline = time.time() + timeout
    for proc, url in servers:
        while True:
            assert proc.poll() is None, f"the server at {url} exited with {proc.returncode}"
            try:
                call(url, "/health", None, 5.0)
                break
            except ServerFailed:
                assert time.time() < deadline, f"the server at {url} did not start in {timeout} s"
                time.sleep(1.0)


def kill_at(monkeypatch, step_to_kill: int, proc):
    """SIGKILL ``proc`` when the rollouts of step ``step_to_kill`` are asked for (after that step's push)."""
    import signal

    from posttrain.inference.vllm_servers import VLLMServers

    original, calls = VLLMServers.generate, []

    def generate(self, prompts, sampling=None):
        calls.append(1)
        if len(calls) == step_to_kill and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        return original(self, prompts, sampling)

    monkeypatch.setattr(VLLMServers, "generate", generate)


def final_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_vllm_servers_killed_mid_run_the_run_goes_on_or_resumes_exactly(mod2, monkeypatch, capfd):
    """Two ``posttrain serve --engine vllm`` processes on localhost. (1) 6 GRPO steps on servers A and B,
    B killed at step 3: its share goes to A and the run ends with the weights of a run on A alone.
    (2) A run on A alone, A killed at step 5: a one-line error; a new server C; the same command with
    ``vllm_servers: [C]`` resumes from the step-4 checkpoint and ends with the same weights again. (3) A
    run with ``async_steps: 1`` on C: rollouts one step stale."""
    monkeypatch.setenv("POSTTRAIN_API_KEY", SERVER_KEY)
    servers = [start_server(mod2["sft"], 0), start_server(mod2["sft"], 1)]
    (a, url_a), (b, url_b) = servers
    c = None
    try:
        wait_ready(servers)
        # the OpenAI-compatible route of the same servers: greedy text of the vLLM engine
        from posttrain.inference.openai_engine import OpenAIEngine
        from posttrain.inference.vllm_servers import VLLMServers

        prompt = [{"role": "user", "content": "What is 1234 mod 2?"}]
        chat = OpenAIEngine(mod2["sft"], url_a + "/v1", api_key=SERVER_KEY).generate([prompt], SamplingParams(max_new_tokens=4, temperature=0.0))
        tok = load_tokenizer(mod2["sft"])
        rollout = VLLMServers([url_b], tok).generate([prompt], SamplingParams(max_new_tokens=4, temperature=0.0))
        assert chat[0].text == rollout[0].text

        steps = {"max_steps": 6, "save_steps": 2, "seed": 3, "engine": "vllm"}
        reference = mod2["root"] / "servers-reference"
        rlvr(mod2, reference, vllm_servers=[url_a], **steps)
        kill_at(monkeypatch, 3, b)
        survived = mod2["root"] / "servers-b-killed"
        rlvr(mod2, survived, vllm_servers=[url_a, url_b], **steps)
        assert f"vLLM server {url_b} left out (rollouts: " in capfd.readouterr().err
        assert len(metrics_rows(survived)) == 6
        want = final_weights(reference)
        assert all(torch.equal(v, want[k]) for k, v in final_weights(survived).items())

        kill_at(monkeypatch, 5, a)
        resumed = mod2["root"] / "servers-a-killed"
        with pytest.raises(UserError, match="no server left of .*restart them and run the same command again"):
            rlvr(mod2, resumed, vllm_servers=[url_a], **steps)
        c, url_c = start_server(mod2["sft"], 0)
        wait_ready([(c, url_c)])
        monkeypatch.undo()  # the kill, and with it the key: set it again
        monkeypatch.setenv("POSTTRAIN_API_KEY", SERVER_KEY)
        rlvr(mod2, resumed, vllm_servers=[url_c], **steps)
        assert "resum" in capfd.readouterr().err.lower()
        assert all(torch.equal(v, want[k]) for k, v in final_weights(resumed).items())

        # (3) rollouts one step ahead from server C (a thread pushes each job's weights, then generates)
        ahead = mod2["root"] / "servers-async"
        rlvr(mod2, ahead, vllm_servers=[url_c], async_steps=1, vllm_importance_sampling_cap=2.0, **steps)
        rows = metrics_rows(ahead)
        assert [r["staleness"] for r in rows] == [0, 1, 1, 1, 1, 1]
        assert all(r["engine_logprob_abs_diff"] > 0 for r in rows[1:]) and set().union(*rows) <= documented_metrics()
    finally:
        for proc in (a, b, c):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_data_command_through_vllm_matches_the_transformers_engine(thinker, tmp_path):
    """``posttrain data solve --engine vllm:<model>``: greedy solutions equal the local engine's on >= 90%."""
    from conftest import write_jsonl

    from posttrain.cli import main

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question": f"What is {a} plus {a + 3}?", "answer": f"#### {2 * a + 3}"}
                                                 for a in range(12)])
    texts = {}
    for name, spec in (("vllm", f"vllm:{thinker['path']}"), ("local", thinker["path"])):
        assert main(["data", "solve", "--prompts", str(prompts), "--engine", spec, "--samples", "1", "--temperature", "0",
                     "--max-new-tokens", "24", "--output", str(tmp_path / name)]) == 0
        records = [json.loads(x) for x in (tmp_path / name / "records.jsonl").read_text().splitlines()]
        texts[name] = [r["solutions"][0]["text"] for r in records]
    assert len(texts["vllm"]) == 12
    assert sum(a == b for a, b in zip(texts["vllm"], texts["local"])) >= 0.9 * 12, texts


def test_eval_with_a_chat_template_on_vllm_matches_the_transformers_engine(thinker, tmp_path, monkeypatch):
    """``posttrain eval --engine vllm --chat-template chatml`` (a base model evaluated in its successors'
    format): vLLM is given prompts rendered with that template, and greedy outputs equal the
    transformers engine's on >= 90%."""
    from conftest import write_jsonl

    from posttrain.data import chat
    from posttrain.eval import runner

    data = write_jsonl(tmp_path / "g.jsonl", [{"question": f"What is {a} plus {a + 3}?", "answer": f"#### {2 * a + 3}"}
                                              for a in range(8)])
    engines, real = [], runner.local_engine
    monkeypatch.setattr(runner, "local_engine", lambda *a, **k: engines.append(real(*a, **k)) or engines[-1])
    outs = {}
    for kind in ("vllm", "transformers"):
        runner.evaluate(thinker["path"], ["gsm8k"], tmp_path / kind, data={"gsm8k": str(data)}, engine=kind,
                        chat_template="chatml", max_new_tokens=24)
        outs[kind] = [json.loads(x)["output"] for x in (tmp_path / kind / "samples.jsonl").read_text().splitlines()]
    assert engines[0].tokenizer.chat_template == chat.CHATML
    assert len(outs["vllm"]) == 8
    assert sum(a == b for a, b in zip(outs["vllm"], outs["transformers"])) >= 0.9 * 8, outs


def test_a_gemma3_stand_in_generates_and_takes_weight_pushes(tmp_path):
    """The ``gemma3-270m`` alias's family on vLLM (sliding-window and global layers, tied and scaled
    embeddings), with a tiny stand-in of head_dim 64: its log-probs of its own completions equal our
    forward's, before and after a weight push (the RLVR engine's path)."""
    from conftest import addition_records

    from posttrain.inference.vllm_engine import VLLMEngine
    from posttrain.models import build_tiny

    path = tmp_path / "gemma3"
    model, _ = build_tiny(path, [json.dumps(r) for r in addition_records(60)], vocab_size=300, hidden_size=128,
                          num_layers=2, num_heads=2, num_kv_heads=1, arch="gemma3", seed=1)
    engine = VLLMEngine(str(path), seed=0)
    prompts = [r["messages"][:1] for r in addition_records(4)]

    def check(model):
        for c in engine.generate(prompts, SamplingParams(max_new_tokens=24)):  # past the 16-token sliding window
            assert len(c.token_ids) > 0
            assert logprob_gap(engine, model, prompts, c) <= 1e-3

    check(model.eval())
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.load_weights(model)
    check(model)
