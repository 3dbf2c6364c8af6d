"""Every trained model carries a contamination report: its training records checked against evaluation
sets, per task, in manifest.json; `posttrain run`'s report shows it."""

import json

import pytest
from conftest import addition_records, write_jsonl

from posttrain.config import SFTConfig
from posttrain.config_io import load_config
from posttrain.errors import UserError
from posttrain.train.sft import run_sft


def sft(tmp_path, model, data, name, **kw):
    base = {"model": str(model), "output_dir": str(tmp_path / name), "chat_template": "tulu",
            "datasets": [{"path": str(data)}], "max_seq_length": 64, "per_device_train_batch_size": 4,
            "learning_rate": 1e-3, "max_steps": 2, "save_steps": 0}
    return run_sft(load_config(SFTConfig, base={**base, **kw}))


def verifiable(question: str) -> dict:
    return {"messages": [{"role": "user", "content": question}], "ground_truth": "0", "verifier": "gsm8k"}


def test_training_records_that_hold_evaluation_items_are_flagged(tmp_path, tiny_model_dir):
    train = addition_records(40)
    questions = [r["messages"][0]["content"] for r in train]
    leaked = questions[:3]
    evalset = write_jsonl(tmp_path / "eval.jsonl", [verifiable(q) for q in leaked] + [
        verifiable("Name the largest planet of the solar system, please, in one word."),
        verifiable("Write a haiku about the sea at night under the moon.")])
    data = write_jsonl(tmp_path / "train.jsonl", train)
    res = sft(tmp_path, tiny_model_dir, data, "run", decontaminate_against=[f"verifiable={evalset}"])
    report = json.loads((res.output_dir / "manifest.json").read_text())["contamination"]
    expected = sum(q in leaked for q in questions)  # each leaked question, as often as it is trained on
    assert expected >= 3
    assert report["records"] == 40 and report["against"] == {"verifiable": 5}
    assert report["tasks"]["verifiable"]["flagged"] == report["flagged"] == expected
    examples = report["tasks"]["verifiable"]["examples"]
    assert {e["text"] for e in examples} == set(leaked) and all(e["overlap"] == 1.0 for e in examples)
    assert (report["ngram"], report["threshold"]) == (8, 0.5)


def test_off_default_and_a_bad_set(tmp_path, tiny_model_dir, monkeypatch):
    from huggingface_hub import constants

    data = write_jsonl(tmp_path / "train.jsonl", addition_records(8))
    off = sft(tmp_path, tiny_model_dir, data, "off", decontaminate_against=[])
    assert json.loads((off.output_dir / "manifest.json").read_text())["contamination"] == {"checked": False}
    # unset: the built-in suites where present; with an empty hub cache nothing is, and nothing is downloaded
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    default = sft(tmp_path, tiny_model_dir, data, "default")
    report = json.loads((default.output_dir / "manifest.json").read_text())["contamination"]
    assert report["against"] == {} and report["flagged"] == 0
    assert set(report["unavailable"]) == {"gsm8k", "math500", "ifeval", "humaneval", "gsm8k_fewshot", "mc", "judge_winrate"}
    with pytest.raises(UserError, match="decontaminate_against: verifiable="):
        sft(tmp_path, tiny_model_dir, data, "bad", decontaminate_against=[f"verifiable={tmp_path / 'missing.jsonl'}"])
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_the_run_report_shows_it(tmp_path, tiny_model_dir):
    from posttrain.pipeline import run

    train = addition_records(40)
    evalset = write_jsonl(tmp_path / "eval.jsonl", [verifiable(r["messages"][0]["content"]) for r in train[:2]])
    data = write_jsonl(tmp_path / "train.jsonl", train)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nstages:\n  - name: sft\n    stage: sft\n    config:\n"
                      f"      model: {tiny_model_dir}\n      datasets: [{{path: {data}}}]\n      max_seq_length: 64\n"
                      f"      per_device_train_batch_size: 4\n      max_steps: 1\n      save_steps: 0\n"
                      f"      decontaminate_against: [verifiable={evalset}]\n")
    run(recipe)
    text = (tmp_path / "run" / "report.md").read_text()
    flagged = sum(r["messages"][0]["content"] in {t["messages"][0]["content"] for t in train[:2]} for r in train)
    assert f"| sft | verifiable (2) | verifiable: {flagged} of 40 |" in text
