"""Mid-training (packed text, token-ratio mixing, cosine stage 1, linear anneal to zero), model soups,
and the synthetic arithmetic generators with disjoint held-out sets."""

import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.config import DataSource, MidtrainConfig
from posttrain.config_io import load_config
from posttrain.data.synth import arithmetic as ar
from posttrain.errors import UserError
from posttrain.models import build_tiny, load_tokenizer
from posttrain.train.midtrain import TokenRows, mixed_index, run_midtrain, tokenize_source
from posttrain.train.soup import soup


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("mid")
    add = [ar.corpus_line("add", a, b) for a, b in ar.problems("add", 300, 2, 0)]
    mul = [ar.corpus_line("mul", a, b) for a, b in ar.problems("mul", 300, 2, 0)]
    (root / "add.txt").write_text("\n".join(add) + "\n")
    (root / "mul.txt").write_text("\n".join(mul) + "\n")
    build_tiny(root / "base", add[:100] + mul[:100], vocab_size=320, seed=0)
    return root


def config(corpus, out, **over):
    base = {"model": str(corpus / "base"), "output_dir": str(out), "datasets": [{"path": str(corpus / "add.txt")}],
            "max_seq_length": 64, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "max_steps": 60,
            "warmup_ratio": 0.1, "save_steps": 0, "seed": 0}
    return load_config(MidtrainConfig, base={**base, **over})


def test_rows_restart_positions_after_each_document(corpus, tmp_path):
    tok = load_tokenizer(str(corpus / "base"))
    path = tokenize_source(DataSource(path=str(corpus / "add.txt")), tok, tmp_path)
    tokens = torch.from_numpy(__import__("numpy").fromfile(path, dtype="uint32").astype("int64"))
    lines = (corpus / "add.txt").read_text().splitlines()
    assert int((tokens == tok.eos_token_id).sum()) == len(lines)
    rows = TokenRows([path], [(0, 0), (0, 3)], 64, tok.eos_token_id)
    row = rows[1]
    assert row["input_ids"] == tokens[192:256].tolist()
    for i in range(1, 64):  # a position is 0 exactly after an EOS, else the previous one plus one
        want = 0 if row["input_ids"][i - 1] == tok.eos_token_id else row["position_ids"][i - 1] + 1
        assert row["position_ids"][i] == want
    assert row["num_samples"] == 1 + sum(t == tok.eos_token_id for t in row["input_ids"][:-1])


def test_token_ratio_mixing():
    index = mixed_index([100, 10], [0.7, 0.3], 200, seed=0)
    assert sum(1 for s, _ in index if s == 0) == 140 and sum(1 for s, _ in index if s == 1) == 60  # source 1 upsampled
    assert len({w for s, w in index if s == 1}) == 10
    assert len(mixed_index([5, 7], [None, None], None, 0)) == 12
    with pytest.raises(UserError, match="for every midtrain source or for none"):
        mixed_index([5, 7], [0.5, None], None, 0)


def test_stage_one_learns_then_the_anneal_decays_linearly_to_zero(corpus, tmp_path):
    stage1 = run_midtrain(config(corpus, tmp_path / "s1", lr_scheduler_type="cosine_min", min_lr_ratio=0.1))
    rows = [json.loads(x) for x in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in rows[-5:]) / 5 < 0.6 * sum(r["loss"] for r in rows[:5]) / 5
    lrs = [r["learning_rate"] for r in rows]
    assert max(lrs) == pytest.approx(3e-3) and lrs[-1] == pytest.approx(3e-4, rel=0.05)  # cosine down to 10%
    anneal = run_midtrain(config(corpus, tmp_path / "anneal", model=str(stage1.output_dir), anneal_from=str(tmp_path / "s1"),
                                 lr_scheduler_type="linear", warmup_ratio=0.0, total_tokens=64 * 8 * 20,
                                 datasets=[{"path": str(corpus / "add.txt"), "fraction": 0.5},
                                           {"path": str(corpus / "mul.txt"), "fraction": 0.5}]))
    arows = [json.loads(x) for x in (tmp_path / "anneal" / "metrics.jsonl").read_text().splitlines()]
    assert len(arows) == 20  # the token budget set the steps
    start = lrs[-1]
    for i, r in enumerate(arows):  # linear from the stage-1 rate to zero
        assert r["learning_rate"] == pytest.approx(start * (1 - i / 20), rel=1e-6, abs=1e-12)
    manifest = json.loads((tmp_path / "anneal" / "manifest.json").read_text())
    assert [d["rows_used"] for d in manifest["data"]] == [80, 80]
    assert anneal.metrics["step"] == 20
    with pytest.raises(UserError, match="decays linearly to zero"):
        config(corpus, tmp_path / "x", anneal_from=str(tmp_path / "s1"), lr_scheduler_type="cosine")


def test_soup_is_the_weighted_average(corpus, tmp_path):
    a = run_midtrain(config(corpus, tmp_path / "a", max_steps=3)).output_dir
    b = run_midtrain(config(corpus, tmp_path / "b", max_steps=3, seed=1)).output_dir
    out = soup([str(a), str(b)], tmp_path / "soup", weights=[1.0, 3.0])
    wa, wb, ws = (load_file(str(p / "model.safetensors")) for p in (a, b, out))
    assert all(torch.allclose(ws[k], 0.25 * wa[k] + 0.75 * wb[k], atol=1e-6) for k in wa)
    assert json.loads((out / "manifest.json").read_text())["weights"] == [1.0, 3.0]
    other = tmp_path / "other"
    build_tiny(other, ["x y z"], vocab_size=300, hidden_size=32, seed=0)
    with pytest.raises(UserError, match="soup: .* has (different parameters|shape)"):
        soup([str(a), str(other)], tmp_path / "bad")


def test_arithmetic_generators_and_disjoint_heldout(tmp_path):
    for op in ("add", "sub", "mul"):
        for a, b in ar.problems(op, 200, 3, seed=2):
            assert ar.worked_solution(op, a, b).endswith(f"#### {ar.answer(op, a, b)}")
    assert ar.worked_solution("sub", 31, 58).endswith("#### -27")
    with pytest.raises(ValueError, match="also in training data"):
        ar.check_disjoint(["What is 1 + 2?"], ["What is 1 + 2?"])
    assert main(["data", "arithmetic", "--output", str(tmp_path / "d"), "--train", "50", "--heldout", "20"]) == 0
    read = lambda name: [json.loads(x) for x in (tmp_path / "d" / name).read_text().splitlines()]  # noqa: E731
    train_q = {r["messages"][0]["content"] for r in read("sft.jsonl")} | {r["messages"][0]["content"] for r in read("rlvr.jsonl")}
    held_q = {r["messages"][0]["content"] for r in read("heldout.jsonl")}
    assert len(held_q) == 60 and not train_q & held_q
    corpus_text = (tmp_path / "d" / "corpus.txt").read_text()
    assert not any(q in corpus_text for q in held_q)
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["ops"]["mul"] == {"train": 50, "heldout": 20}
