"""DPO-family training: reference log-probs and their cache, one forward per step, data checks,
learning on a held-out preference task, and reward models."""

import json

import pytest
import torch
from conftest import parity_pairs, write_jsonl
from transformers import AutoModelForSequenceClassification

from posttrain.config import DPOConfig, RewardConfig
from posttrain.config_io import load_config
from posttrain.data import chat, packing
from posttrain.data.adapters import to_kind
from posttrain.logprobs import TokenLogProbs, collate
from posttrain.models import load_model, load_tokenizer
from posttrain.train import reference
from posttrain.train.dpo import dpo_objective, preference_accuracy, run_dpo, tokenize_pairs
from posttrain.train.reward import RewardModel, pair_accuracy, run_reward


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))


def dpo(tmp_path, model, data, name="dpo", **kw):
    base = {"model": str(model), "output_dir": str(tmp_path / name), "datasets": [{"path": str(data)}],
            "max_seq_length": 64, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "beta": 5.0,
            "loss_type": "dpo_norm", "max_steps": 2, "save_steps": 0, "lr_scheduler_type": "constant"}
    return run_dpo(load_config(DPOConfig, base={**base, **kw}))


def rows_for(model_dir, data_path, max_length=64):
    tok = load_tokenizer(str(model_dir))
    pairs = [to_kind(json.loads(x), "preference", "auto", "t") for x in open(data_path)]
    samples, _ = tokenize_pairs(tok, pairs, max_length)
    return tok, pairs, packing.unpacked(samples)


def test_reference_logps_equal_an_independent_forward(parity_task):
    tok, pairs, rows = rows_for(parity_task["sft"], parity_task["train"])
    model = load_model(str(parity_task["sft"]))
    ref = reference.compute(model, rows[:12], 12, tok.pad_token_id, batch_size=5)
    for k, pair in enumerate(pairs[:12]):
        for side, col in (("chosen", 0), ("rejected", 1)):
            prompt = chat.prompt_ids(tok, pair["prompt"])
            full = tok(chat.render(tok, pair["prompt"] + pair[side]), add_special_tokens=False)["input_ids"]
            assert full[:len(prompt)] == prompt
            logits = model(torch.tensor([full])).logits[0].double().log_softmax(-1)
            want = sum(float(logits[t - 1, full[t]]) for t in range(len(prompt), len(full)))
            assert float(ref[k, col]) == pytest.approx(want, abs=1e-4)


def test_reference_cache_hits_and_every_setting_invalidates_it(tmp_path, parity_task):
    def run(name, **kw):
        model, data = kw.pop("model", parity_task["sft"]), kw.pop("data", parity_task["train"])
        m = json.loads((dpo(tmp_path, model, data, name, **kw)
                        .output_dir / "manifest.json").read_text())
        return m["data_stats"]["reference_cache"]

    first = run("a")
    assert first["hit"] is False
    again = run("b", max_steps=3)  # training settings do not change the reference
    assert again == {**first, "hit": True}
    changed = {
        "template": run("c", chat_template="chatml"),
        "truncation": run("d", max_seq_length=20),
        "data": run("e", data=write_jsonl(tmp_path / "few.jsonl", parity_pairs([101, 202, 303, 404, 505, 606, 707, 808]))),
        "model": run("f", model=parity_task["base"]),
        "loss": run("g", loss_type="dpo"),
    }
    paths = {first["path"]} | {c["path"] for c in changed.values()}
    assert len(paths) == 6 and not any(c["hit"] for c in changed.values())


def test_chosen_and_rejected_share_one_forward(parity_task):
    tok, _, rows = rows_for(parity_task["sft"], parity_task["train"])
    model = load_model(str(parity_task["sft"]))
    calls = []

    class Counting(TokenLogProbs):
        def forward(self, *a, **k):
            calls.append(a[0].shape)
            return super().forward(*a, **k)

    ref = torch.zeros(len(rows), 2, dtype=torch.float64)
    cfg = load_config(DPOConfig, base={"model": "m", "output_dir": "o", "datasets": [{"path": "p"}]})
    batch = collate(rows[:4], tok.pad_token_id)
    objective = dpo_objective(cfg, ref)
    loss, metrics = objective.loss(Counting(model), batch, batch[objective.items_key])
    assert len(calls) == 1 and batch["num_samples"] == 8 and batch["num_pairs"] == 4 and loss.requires_grad
    # the same numbers from each sequence on its own (8 forwards, no packing), by hand: with a zero
    # reference, reward = beta * logp; accuracy = share of pairs with logp(chosen) > logp(rejected)
    with torch.no_grad():
        alone = []
        for r in rows[:4]:
            for a, b in split_bounds(r):  # chosen, then rejected
                seq = {"input_ids": r["input_ids"][a:b], "labels_mask": r["labels_mask"][a:b]}
                one = collate(packing.unpacked([seq]), tok.pad_token_id)
                alone.append(float(TokenLogProbs(model)(one["input_ids"], one["position_ids"], one["labels"]).sum()))
    chosen, rejected = alone[0::2], alone[1::2]
    assert metrics["rewards/accuracies"] == sum(c > r for c, r in zip(chosen, rejected)) / 4
    assert metrics["logps/chosen"] == pytest.approx(sum(chosen) / 4, abs=1e-4)
    assert metrics["rewards/margins"] == pytest.approx(cfg.beta * (sum(chosen) - sum(rejected)) / 4, abs=1e-5)


def split_bounds(row: dict) -> list[tuple[int, int]]:
    """Where the chosen and the rejected sequence of a pair row start and end (positions restart at 0)."""
    starts = [j for j, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return list(zip(starts, starts[1:]))


def test_bad_pairs_are_counted_and_dropped(tmp_path, parity_task):
    good = parity_pairs(list(range(100, 116)))
    msgs = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    bad = [{"prompt": "Is 7 even or odd?", "chosen": "odd", "rejected": "odd"},
           {"chosen": msgs("Is 1 even or odd?", "odd"), "rejected": msgs("Is 2 even or odd?", "even")},
           {"prompt": "Is 9 even or odd?", "chosen": "odd", "rejected": " "}]
    data = write_jsonl(tmp_path / "mixed.jsonl", good + bad)
    m = json.loads((dpo(tmp_path, parity_task["sft"], data).output_dir / "manifest.json").read_text())
    assert m["data_stats"]["dropped"] == {"identical sides": 1, "prompts differ": 1, "empty rejected response": 1}
    assert m["data_stats"]["kept"] == 16


def test_dpo_norm_learns_held_out_preferences(tmp_path, parity_task):
    tok, _, held_rows = rows_for(parity_task["sft"], parity_task["heldout"])
    before = preference_accuracy(load_model(str(parity_task["sft"])), held_rows, tok.pad_token_id, normalize=True)
    assert 0.3 <= before["preference_accuracy"] <= 0.7  # about chance
    res = dpo(tmp_path, parity_task["sft"], parity_task["train"], max_steps=300, logging_steps=10, eval_steps=150,
              eval_datasets=[{"path": str(parity_task["heldout"])}])
    after = preference_accuracy(load_model(str(res.output_dir)), held_rows, tok.pad_token_id, normalize=True)
    assert after["preference_accuracy"] >= 0.9
    assert res.metrics["eval/preference_accuracy"] == after["preference_accuracy"]
    lines = [json.loads(x) for x in (res.output_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"] and lines[-1]["rewards/margins"] > 1.0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in lines[-1]


def test_reward_model_learns_and_is_a_standard_checkpoint(tmp_path, parity_task):
    tok, pairs, held_rows = rows_for(parity_task["sft"], parity_task["heldout"])
    res = run_reward(load_config(RewardConfig, base={
        "model": str(parity_task["sft"]), "output_dir": str(tmp_path / "rm"),
        "datasets": [{"path": str(parity_task["train"])}], "eval_datasets": [{"path": str(parity_task["heldout"])}],
        "max_seq_length": 64, "per_device_train_batch_size": 16, "learning_rate": 1e-3, "weight_decay": 0.0,
        "lr_scheduler_type": "constant", "max_steps": 500, "save_steps": 0, "logging_steps": 25}))
    assert res.metrics["eval/accuracy"] >= 0.9
    hf = AutoModelForSequenceClassification.from_pretrained(res.output_dir).eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tok.pad_token_id
    rm = RewardModel.from_pretrained(str(res.output_dir))
    convs = [p["prompt"] + p[side] for p in pairs[:6] for side in ("chosen", "rejected")]
    ours = rm.score(convs)
    texts = [chat.render(rm.tokenizer, c) for c in convs]
    enc = rm.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**enc).logits[:, 0].tolist()
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert pair_accuracy(hf, held_rows, tok.pad_token_id)["accuracy"] == res.metrics["eval/accuracy"]
