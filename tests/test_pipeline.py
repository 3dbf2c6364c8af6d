"""``posttrain run``: stages in order, each feeding the next; a re-run skips finished stages; a changed
stage re-runs it and everything after it; a killed stage resumes; a report gathers the run."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import addition_records, write_jsonl

from posttrain.errors import UserError
from posttrain.pipeline import load_recipe, run
from posttrain.train import checkpoint

DATA = os.path.join(os.path.dirname(__file__), "..", "data")
KILL_AFTER = os.path.join(os.path.dirname(__file__), "kill_after.py")


def recipe(tmp_path, tiny_model_dir, max_steps=30):
    data = write_jsonl(tmp_path / "add.jsonl", addition_records(40))
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": "What is 2 + 3?", "answer": "#### 5"},
                                                   {"question": "What is 4 + 1?", "answer": "#### 5"}])
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""output_dir: {tmp_path / 'run'}
stages:
  - name: sft
    stage: sft
    config:
      model: {tiny_model_dir}
      chat_template: tulu
      datasets: [{{path: {data}, license: CC0-1.0}}]
      max_seq_length: 64
      packing: true
      per_device_train_batch_size: 4
      learning_rate: 3.0e-3
      max_steps: {max_steps}
      save_steps: 10
  - name: eval-sft
    stage: eval
    config:
      tasks: [gsm8k]
      data: {{gsm8k: {questions}}}
      limit: 2
""")
    return path


def test_stages_run_in_order_skip_and_rerun_downstream(tmp_path, tiny_model_dir):
    path = recipe(tmp_path, tiny_model_dir)
    first = run(path)
    assert [s["stage"] for s in first] == ["sft", "eval-sft"] and not any(s["skipped"] for s in first)
    assert first[1]["results"]["gsm8k"]["instances"] == 2
    root = tmp_path / "run"
    report = (root / "report.md").read_text()
    assert "| sft | sft | False |" in report and "CC0-1.0" in report and (root / "loss-sft.png").is_file()
    assert (root / "report.html").read_text().startswith("<!doctype html>")
    assert json.loads((root / "stages.json").read_text())[0]["stage"] == "sft"
    again = run(path)
    assert all(s["skipped"] for s in again)
    assert [s["seconds"] for s in again] == [s["seconds"] for s in first]  # the time each took when it ran
    only_eval = run(path, ["eval-sft.limit=1"])  # a changed eval: the training stage stays
    assert [s["skipped"] for s in only_eval] == [True, False] and only_eval[1]["results"]["gsm8k"]["instances"] == 1
    changed = run(path, ["sft.learning_rate=1.0e-3", "eval-sft.limit=1"])  # upstream change: both re-run
    assert [s["skipped"] for s in changed] == [False, False]
    assert changed[0]["chain_hash"] != first[0]["chain_hash"] and changed[1]["chain_hash"] != only_eval[1]["chain_hash"]
    questions = tmp_path / "q.jsonl"  # a data file rewritten under the same path: the stage naming it re-runs
    questions.write_text(questions.read_text().replace("2 + 3", "3 + 2"))
    new_questions = run(path, ["sft.learning_rate=1.0e-3", "eval-sft.limit=1"])
    assert [s["skipped"] for s in new_questions] == [True, False]
    write_jsonl(tmp_path / "add.jsonl", addition_records(41))
    assert [s["skipped"] for s in run(path, ["sft.learning_rate=1.0e-3", "eval-sft.limit=1"])] == [False, False]


def test_a_failed_stage_keeps_the_times_of_the_stages_before_it(tmp_path, tiny_model_dir):
    path = recipe(tmp_path, tiny_model_dir)
    with pytest.raises(UserError, match="missing.jsonl"):
        run(path, [f"eval-sft.data={{gsm8k: {tmp_path}/missing.jsonl}}"])
    ran = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert [s["stage"] for s in ran] == ["sft"] and ran[0]["seconds"] > 0
    again = run(path)
    assert again[0]["skipped"] and again[0]["seconds"] == ran[0]["seconds"] and not again[1]["skipped"]


def test_a_killed_stage_resumes(tmp_path, tiny_model_dir):
    path = recipe(tmp_path, tiny_model_dir, max_steps=40)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, KILL_AFTER, "20", "run", str(path)], env=env, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "run" / "sft" / "manifest.json").exists()
    assert checkpoint.latest(tmp_path / "run" / "sft").name == "checkpoint-20"
    again = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(path)], env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "sft: resuming from" in again.stderr
    assert json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())["resumed_from"]


def test_bad_recipes(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("output_dir: x\nstages:\n  - {name: a, stage: cook}\n")
    with pytest.raises(UserError, match=r"stages\[0\]: needs 'name' and 'stage'"):
        load_recipe(bad)
    bad.write_text("output_dir: x\nstages:\n  - {name: a, stage: sft}\n")
    with pytest.raises(UserError, match="expected STAGE.key=value"):
        load_recipe(bad, ["b.max_steps=3"])
    with pytest.raises(UserError, match="no 'model' and no earlier training stage"):
        run(bad)


@pytest.mark.parametrize("name", ["smollm2-135m.yaml", "tulu3-8b.yaml"])
def test_shipped_recipes_are_valid(name, tmp_path):
    """Every stage of the shipped recipes builds a valid config (the data itself lives on the hub)."""
    from posttrain import config as cfgmod
    from posttrain.config_io import load_config
    from posttrain.stages import TRAINING

    path = os.path.join(os.path.dirname(__file__), "..", "recipes", name)
    classes = {"midtrain": cfgmod.MidtrainConfig, "sft": cfgmod.SFTConfig, "dpo": cfgmod.DPOConfig,
               "reward": cfgmod.RewardConfig, "rlvr": cfgmod.RLVRConfig}
    if name == "tulu3-8b.yaml":  # meant for 8 GPUs, every training stage sharded (docs/distributed.md)
        assert "torchrun --nproc_per_node 8 -m posttrain.cli run recipes/tulu3-8b.yaml" in open(path).read()
        assert {s["config"].get("parallel") for s in load_recipe(path)["stages"] if s["stage"] in TRAINING} == {"fsdp"}
    model = None
    for s in load_recipe(path)["stages"]:
        if s["stage"] in TRAINING:
            cfg = load_config(classes[s["stage"]], base={"model": model, "output_dir": str(tmp_path), **s["config"]})
            model = cfg.model
        else:
            assert s["config"].get("tasks")


@pytest.mark.parametrize("name", ["smollm2-135m-ifeval.yaml", "gemma3-270m.yaml"])
def test_real_model_recipes_run_a_few_steps_on_a_tiny_stand_in(name, tmp_path, tiny_model_dir, monkeypatch):
    """The recipes of docs/results.md, every stage for a step or two with a tiny model of the same
    family in place of the real one, from the repository root as documented: their keys and data
    files stay valid."""
    from posttrain.models import build_tiny
    from posttrain.stages import TRAINING

    if name.startswith("gemma3"):
        tiny_model_dir = tmp_path / "gemma3"
        build_tiny(tiny_model_dir, [json.dumps(r) for r in addition_records(60)], vocab_size=300, hidden_size=64,
                   num_layers=2, num_heads=2, num_kv_heads=1, arch="gemma3", seed=1)
    root = os.path.join(os.path.dirname(__file__), "..")
    monkeypatch.chdir(root)
    path = os.path.join("recipes", name)
    overrides = []
    for s in load_recipe(path)["stages"]:
        n = s["name"]
        if "model" in s["config"]:
            overrides.append(f"{n}.model={tiny_model_dir}")
        if s["config"].get("engine") == "vllm":  # vLLM is the optional extra (test_vllm.py covers it)
            overrides.append(f"{n}.engine=transformers")
        if s["config"].get("init_embeddings_from"):  # Gemma's token names; the stand-in's vocabulary has others
            overrides.append(f"{n}.init_embeddings_from={{'<pad>': '</s>'}}")
        if s["stage"] == "dpo" and "pairs.jsonl" in s["config"]["datasets"][0]["path"]:
            # a tiny random model's 8-token samples never finish, so its on-policy stage pairs nothing
            pairs = write_jsonl(tmp_path / "pairs.jsonl", [
                {"prompt": r["messages"][:1], "chosen": r["messages"][1:], "rejected": [
                    {"role": "assistant", "content": r["messages"][1]["content"][::-1]}]} for r in addition_records(16)])
            overrides += [f"{n}.datasets=[{{path: {pairs}}}]", f"{n}.gradient_accumulation_steps=1"]
        if s["stage"] in TRAINING:
            overrides += [f"{n}.max_steps=2", f"{n}.save_steps=100", f"{n}.max_seq_length=128"]
            if s["stage"] == "rlvr":
                overrides += [f"{n}.max_completion_length=8", f"{n}.max_prompt_length=384"]
        elif s["stage"] == "onpolicy_pairs":
            overrides += [f"{n}.samples=2", f"{n}.max_new_tokens=8"]
        else:
            overrides += [f"{n}.limit=2", f"{n}.max_new_tokens=8"]
    recipe_file = tmp_path / name
    recipe_file.write_text(open(path).read().replace(" runs/", f" {tmp_path}/runs/"))
    summary = run(recipe_file, overrides)
    assert [e["stage"] for e in summary] == [s["name"] for s in load_recipe(path)["stages"]]
    for e in summary:
        if e["kind"] == "eval":
            assert all(r["instances"] == 2 for r in e["results"].values())
        elif e["kind"] in TRAINING:
            assert e["metrics"]["step"] == 2


def test_stage_names_that_are_paths_are_refused(tmp_path):
    from posttrain.errors import UserError
    from posttrain.pipeline import load_recipe

    for bad in ("../x", "a/b", "..", ".hidden", "/abs"):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"output_dir: {tmp_path / 'run'}\nstages:\n  - {{name: {json.dumps(bad)}, stage: eval}}\n")
        with pytest.raises(UserError, match="must be letters"):
            load_recipe(recipe, [])


def test_a_fresh_stage_never_deletes_a_directory_it_did_not_write(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nstages:\n"
                      f"  - {{name: sft, stage: sft, config: {{model: some-model, output_dir: {out}}}}}\n")
    with pytest.raises(UserError, match="was not written by this stage"):
        run(recipe)
    assert (out / "keep.txt").read_text() == "mine"
