"""Evaluation tasks, the runner's outputs, pass@k, multiple choice by log-likelihood, checkpoint curves,
budget forcing at exact token counts, and the test-time-scaling sweep."""

import gzip
import json
import os

import pytest
import torch
from conftest import addition_records, thinker_model, thinking_records, write_jsonl

from posttrain.config import SFTConfig
from posttrain.config_io import load_config
from posttrain.errors import UserError
from posttrain.eval.runner import evaluate, evaluate_checkpoints
from posttrain.eval.tasks import SUITES, TASKS, resolve_tasks
from posttrain.eval.tasks.base import load
from posttrain.eval.tasks.humaneval import pass_at_k
from posttrain.inference import budget_forcing
from posttrain.inference.engine import SamplingParams, TransformersEngine
from posttrain.models import load_model, load_tokenizer
from posttrain.train.sft import run_sft

DATA = os.path.join(os.path.dirname(__file__), "..", "data")
GSM8K = os.path.join(DATA, "gsm8k", "train.jsonl")


def test_suites_name_known_tasks_and_bad_names_are_refused():
    assert all(t in TASKS for suite in SUITES.values() for t in suite)
    assert [t.name for t in resolve_tasks(["suite:dev"])] == SUITES["dev"]
    with pytest.raises(UserError, match="unknown task 'gsm9k'"):
        resolve_tasks(["gsm9k"])


def test_task_scorers_on_known_outputs():
    (inst,) = load(TASKS["gsm8k"], GSM8K, 1)
    assert TASKS["gsm8k"].score(f"so the answer is\n#### {inst['ground_truth']}", inst)["score"] == 1.0
    assert TASKS["gsm8k"].score("#### 0.5", inst)["score"] == 0.0
    (m,) = load(TASKS["math500"], os.path.join(DATA, "math", "math500_dev.jsonl"), 1)
    assert TASKS["math500"].score(f"\\boxed{{{m['ground_truth']}}}", m)["score"] == 1.0
    few = load(TASKS["gsm8k_fewshot"], GSM8K, 1)[0]["prompt"]
    assert len(few) == 9 and few[1]["role"] == "assistant" and few[-1]["content"].startswith(inst["prompt"][0]["content"][:40])


def test_humaneval_pass_at_k_is_the_unbiased_estimator():
    def reference(n, c, k):  # Chen et al. (2021), the numerically stable product form
        if n - c < k:
            return 1.0
        prod = 1.0
        for i in range(n - c + 1, n + 1):
            prod *= 1.0 - k / i
        return 1.0 - prod

    for n, c, k in [(5, 2, 1), (10, 3, 5), (20, 0, 10), (20, 20, 1), (7, 6, 3)]:
        assert pass_at_k(n, c, k) == pytest.approx(reference(n, c, k))
    task = TASKS["humaneval"]
    raw = [json.loads(x) for x in gzip.open(os.path.join(DATA, "humaneval", "HumanEval.jsonl.gz"), "rt")][:3]
    insts = load(task, os.path.join(DATA, "humaneval", "HumanEval.jsonl.gz"), 3)
    samples = [{"index": i["index"], **task.score(r["canonical_solution"] if j < 2 else "    return None\n", i)}
               for i, r in zip(insts, raw) for j in range(3)]
    assert task.metrics(samples) == {"pass@1": pytest.approx(2 / 3)}


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("eval")
    res = run_sft(load_config(SFTConfig, base={
        "model": str(tiny_model_dir), "output_dir": str(root / "sft"), "chat_template": "tulu",
        "datasets": [{"path": str(write_jsonl(root / "d.jsonl", addition_records(40)))}], "max_seq_length": 64,
        "packing": True, "per_device_train_batch_size": 4, "learning_rate": 3e-3, "max_steps": 40, "save_steps": 20}))
    return res.output_dir


def test_eval_writes_results_samples_and_a_table(sft_model, tmp_path):
    ifeval = os.path.join(DATA, "ifeval", "ifeval_dev.jsonl")
    results = evaluate(str(sft_model), ["gsm8k", "ifeval"], tmp_path / "out", limit=6,
                       data={"gsm8k": GSM8K, "ifeval": ifeval}, batch_size=8)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["results"] == results and saved["config"]["limit"] == 6
    assert set(results["ifeval"]) >= {"prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                                      "inst_level_loose_acc"}
    samples = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12
    for s in samples:
        assert {"task", "index", "prompt", "output", "extracted", "ground_truth", "score"} <= set(s)
    gsm = [s for s in samples if s["task"] == "gsm8k"]
    assert results["gsm8k"]["accuracy"] == pytest.approx(sum(s["score"] for s in gsm) / len(gsm))
    assert "| gsm8k | accuracy |" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(UserError, match="--data mc=...: mc is not among the tasks"):
        evaluate(str(sft_model), ["gsm8k"], tmp_path / "x", data={"mc": GSM8K})
    with pytest.raises(UserError, match=r"train.jsonl:1: field 'choices' is missing"):
        evaluate(str(sft_model), ["mc"], tmp_path / "x", data={"mc": GSM8K})


def test_eval_renders_prompts_with_a_chosen_chat_template(sft_model, tmp_path, monkeypatch):
    from posttrain.data import chat
    from posttrain.eval import runner

    seen = []

    class Spy(runner.TransformersEngine):
        def __init__(self, model, tokenizer, **kwargs):
            seen.append(tokenizer.chat_template)
            super().__init__(model, tokenizer, **kwargs)

    monkeypatch.setattr(runner, "TransformersEngine", Spy)
    evaluate(str(sft_model), ["gsm8k"], tmp_path / "a", limit=2, data={"gsm8k": GSM8K})
    evaluate(str(sft_model), ["gsm8k"], tmp_path / "b", limit=2, data={"gsm8k": GSM8K}, chat_template="chatml")
    assert seen[0] != chat.CHATML and seen[1] == chat.CHATML
    config = json.loads((tmp_path / "b" / "results.json").read_text())["config"]
    assert config["chat_template"] == "chatml" and config["model_license"] == "unknown"
    with pytest.raises(UserError, match="chat_template: only for a local model"):
        evaluate("openai:m@http://127.0.0.1:9", ["gsm8k"], tmp_path / "c", data={"gsm8k": GSM8K}, chat_template="chatml")


def test_multiple_choice_picks_the_most_likely_option(sft_model, tmp_path):
    model, tok = load_model(str(sft_model)), load_tokenizer(str(sft_model))
    rows = [{"question": "What is 2 + 3?", "choices": ["5", "9", "1 1"], "answer": "A"},
            {"question": "What is 4 + 4?", "choices": ["3", "8"], "answer": 1}]
    evaluate(str(sft_model), ["mc"], tmp_path / "mc", data={"mc": str(write_jsonl(tmp_path / "mc.jsonl", rows))})
    samples = [json.loads(x) for x in (tmp_path / "mc" / "samples.jsonl").read_text().splitlines()]
    from posttrain.data import chat

    for s in samples:  # each option's log-likelihood against a direct forward pass
        prompt = chat.prompt_ids(tok, s["prompt"])
        for choice, got in zip(rows[s["index"]]["choices"], s["option_logprobs"]):
            option = tok(" " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([prompt + option])).logits[0].float(), -1)
            want = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(option))
            assert got == pytest.approx(want, abs=1e-4)
        assert s["extracted"] == max(range(len(s["option_logprobs"])), key=s["option_logprobs"].__getitem__)


def test_checkpoints_give_a_curve(sft_model, tmp_path):
    out = tmp_path / "curve"
    result = evaluate_checkpoints(sft_model, ["gsm8k"], out, limit=3, data={"gsm8k": GSM8K}, batch_size=4)
    assert [c["step"] for c in result["checkpoints"]] == [20, 40]
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "step-20" / "results.json").is_file() and (out / "results.md").is_file()


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    """A tiny model SFT'd to answer with a short thinking block (conftest.thinking_records)."""
    path = thinker_model(tmp_path_factory.mktemp("think"))
    model, tok = load_model(path), load_tokenizer(path)
    return TransformersEngine(model, tok, batch_size=16), [r["messages"][:1] for r in thinking_records()[:12]]


def test_budget_forcing_caps_and_extends_at_exact_token_counts(thinker):
    engine, prompts = thinker
    tok = engine.tokenizer
    # the model on its own: a short thinking block that it ends itself
    free = budget_forcing.generate(engine, prompts, budget_forcing.BudgetForcing(think_start=""),
                                   SamplingParams(max_new_tokens=40))
    natural = [f.thinking_tokens for f in free]
    assert all(0 < n < 20 for n in natural) and not any(f.forced_stop for f in free) and all(f.waits == 0 for f in free)
    # a cap below every natural length: exactly that many thinking tokens, then the answer
    capped = budget_forcing.generate(engine, prompts, budget_forcing.BudgetForcing(think_start="", max_thinking_tokens=3))
    for f, n in zip(capped, natural):
        assert f.thinking_tokens == 3 and f.forced_stop and f.text.startswith(f.thinking + "</think>\nFinal Answer:")
    # extensions: every early end is replaced by "Wait", exactly num_wait times, then the model may stop
    wait_ids = tok("Wait", add_special_tokens=False)["input_ids"]
    extended = budget_forcing.generate(engine, prompts, budget_forcing.BudgetForcing(think_start="", num_wait=2),
                                       SamplingParams(max_new_tokens=40))
    for f, n in zip(extended, natural):
        assert f.waits == 2 and f.thinking.count("Wait") >= 2
        assert f.thinking_tokens > n and f.thinking_ids[n:n + len(wait_ids)] == wait_ids
    # a minimum: the model is pushed past it, and the cap still holds
    longer = budget_forcing.generate(engine, prompts, budget_forcing.BudgetForcing(
        think_start="", min_thinking_tokens=25, max_thinking_tokens=30), SamplingParams(max_new_tokens=40))
    assert all(25 <= f.thinking_tokens <= 30 for f in longer)


def test_tts_sweep_writes_points_and_a_plot(thinker, tmp_path):
    from posttrain.eval.tts import sweep

    engine, _ = thinker
    engine.model.save_pretrained(tmp_path / "m")
    engine.tokenizer.save_pretrained(tmp_path / "m")
    rows = [{"question": f"What is {a} + {b}?", "answer": f"#### {a + b}"} for a, b in [(1, 2), (3, 4), (5, 5), (2, 7)]]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    bf = budget_forcing.BudgetForcing(think_start="")
    result = sweep(str(tmp_path / "m"), "gsm8k", tmp_path / "tts", [2, 8], [1], [1, 3], bf, data=str(data))
    assert len(result["points"]) == 3 * 2
    caps = {p["value"]: p for p in result["points"] if p["setting"] == "max_thinking" and p["majority"] == 1}
    assert caps[2]["mean_thinking_tokens"] == 2.0 and caps[8]["mean_thinking_tokens"] <= 8.0
    assert (tmp_path / "tts" / "tts.png").read_bytes()[:4] == b"\x89PNG"
    plain = sweep(str(tmp_path / "m"), "gsm8k", tmp_path / "plain", [], [], [1, 3], bf, data=str(data), max_new_tokens=5)
    assert [(p["setting"], p["majority"]) for p in plain["points"]] == [("sampling", 1), ("sampling", 3)]
    samples = [json.loads(x) for x in (tmp_path / "plain" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 3 and all(1 <= s["thinking_tokens"] <= 5 and s["waits"] == 0 for s in samples)
    assert plain["points"][1]["mean_thinking_tokens"] == pytest.approx(
        sum(s["thinking_tokens"] for s in samples) / 4)  # 3 samples' worth per question


def test_judge_winrate_with_an_endpoint_and_skipped_without(sft_model, tmp_path):
    from posttrain.inference.engine import Completion
    from posttrain.inference.serve import start_server

    class AlwaysA:  # a judge that always prefers the first answer shown
        def generate(self, prompts, sampling):
            return [Completion("A", [], "stop", i) for i in range(len(prompts)) for _ in range(sampling.n)]

    rows = [{"instruction": f"Say the number {i}.", "output": f"{i}"} for i in range(8)]
    data = {"judge_winrate": str(write_jsonl(tmp_path / "alpaca.jsonl", rows))}
    skipped = evaluate(str(sft_model), ["judge_winrate"], tmp_path / "none", data=data)
    assert skipped == {"judge_winrate": {"skipped": "no judge endpoint: pass --judge openai:<model>@<base_url>"}}
    server = start_server(AlwaysA(), "judge")
    try:
        url = f"{server.url}/v1"
        results = evaluate(str(sft_model), ["judge_winrate"], tmp_path / "judged", data=data, judge=f"openai:judge@{url}")
    finally:
        server.close()
    samples = [json.loads(x) for x in (tmp_path / "judged" / "samples.jsonl").read_text().splitlines()]
    first = [s["model_first"] for s in samples]
    assert 0 < sum(first) < len(first)  # both orders occur
    assert results["judge_winrate"]["win_rate"] == pytest.approx(sum(first) / len(first))
    assert results["judge_winrate"]["unparsed_verdicts"] == 0.0


def test_command_line(sft_model, thinker, tmp_path, capsys):
    from posttrain.cli import main

    assert main(["eval", "--model", str(sft_model), "--tasks", "gsm8k", "--limit", "3", "--data", f"gsm8k={GSM8K}",
                 "--max-new-tokens", "3", "--output", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "results.json").read_text())["results"]["gsm8k"]["instances"] == 3
    samples = [json.loads(x) for x in (tmp_path / "e" / "samples.jsonl").read_text().splitlines()]
    assert max(s["output_tokens"] for s in samples) <= 3  # --max-new-tokens caps the task's own 512
    err = capsys.readouterr().err
    assert "eval gsm8k: 100%" in err and "3/3" in err  # the progress bar (count, rate, ETA) on stderr
    assert main(["eval", "--model", str(sft_model), "--tasks", "gsm8k", "--data", "gsm8k"]) == 2
    assert "expected TASK=PATH" in capsys.readouterr().err
    assert main(["eval", "--tasks", "gsm8k"]) == 2
    engine, _ = thinker
    engine.model.save_pretrained(tmp_path / "m")
    engine.tokenizer.save_pretrained(tmp_path / "m")
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": "What is 1 + 2?", "answer": "#### 3"}])
    assert main(["tts", "--model", str(tmp_path / "m"), "--task", "gsm8k", "--data", f"gsm8k={data}", "--max-thinking", "2,4",
                 "--think-start", "", "--output", str(tmp_path / "t")]) == 0
    points = json.loads((tmp_path / "t" / "results.json").read_text())["points"]
    assert [p["mean_thinking_tokens"] for p in points] == [2.0, 4.0]
    assert "tts max_thinking 4" in capsys.readouterr().err
    assert main(["tts", "--model", str(tmp_path / "m"), "--task", "gsm8k", "--max-thinking", "a,b"]) == 2


def test_compare_pairs_instances_and_gives_standard_errors(tmp_path, capsys):
    """Hand-computed: before 1,0,0,1 and after 1,1,0,1 -> +0.25; differences 0,1,0,0 have sd 0.5, so the
    paired SE is 0.5 / 2; IFEval's instructions pair one by one."""
    from posttrain.cli import main
    from posttrain.eval.compare import compare

    def run(name, gsm, strict):
        rows = [{"task": "gsm8k", "index": i, "score": v} for i, v in enumerate(gsm)]
        rows += [{"task": "ifeval", "index": i, "score": float(all(s)), "strict": s} for i, s in enumerate(strict)]
        return write_jsonl(tmp_path / name / "samples.jsonl", rows).parent

    a = run("a", [1, 0, 0, 1], [[True, False], [True]])
    b = run("b", [1, 1, 0, 1], [[True, True], [False]])
    rows = {(r["task"], r["metric"]): r for r in compare(a, b)}
    g = rows["gsm8k", "score"]
    assert (g["n"], g["before"], g["after"], g["diff"]) == (4, 0.5, 0.75, 0.25)
    assert g["before_se"] == pytest.approx(0.25) and g["after_se"] == pytest.approx((0.75 * 0.25 / 4) ** 0.5)
    assert g["diff_se"] == pytest.approx(0.25)
    inst = rows["ifeval", "inst_level_strict_acc"]
    assert (inst["n"], inst["before"], inst["after"], inst["diff"]) == (3, 2 / 3, 2 / 3, 0.0)
    assert inst["diff_se"] == pytest.approx((2 / 2) ** 0.5 / 3 ** 0.5)  # differences 0, +1, -1
    assert rows["ifeval", "prompt_level_strict_acc"]["diff"] == 0.0
    assert main(["compare", str(a), str(b)]) in (0, None)
    assert "| gsm8k | score | 4 | 0.500 ± 0.250 | 0.750 ± 0.217 | +0.250 ± 0.250 | +1.0 |" in capsys.readouterr().out
    other = run("c", [1, 0], [[True]])
    with pytest.raises(UserError, match="gsm8k: the two runs scored different instances"):
        compare(a, other)
