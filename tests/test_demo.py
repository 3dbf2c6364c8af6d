"""``posttrain demo`` (the embedded SFT demo) and ``posttrain demo --full`` (the whole recipe)."""

import json

from posttrain.cli import main
from posttrain.demo import run_full_demo


def test_sft_demo_learns_addition(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "d"), "max_steps=300"]) == 0
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["before"]["heldout"] <= 0.1 and summary["after"]["train"] >= 0.9 and summary["after"]["heldout"] >= 0.6


def test_full_demo_runs_every_stage_and_a_rerun_skips_them(tmp_path):
    small = ["midtrain.max_steps=20", "anneal.total_tokens=5120", "sft.max_steps=200", "dpo.max_steps=5",
             "rlvr.max_steps=5"]
    stages = run_full_demo(str(tmp_path / "full"), small)
    assert [s["stage"] for s in stages] == ["base", "midtrain", "anneal", "sft", "dpo", "rlvr"]
    assert all(0.0 <= s["heldout_accuracy"] <= 1.0 and "add" in s and "mul" in s for s in stages)
    assert stages[3]["heldout_accuracy"] > stages[0]["heldout_accuracy"]  # SFT learns something
    root = tmp_path / "full"
    held = {json.loads(x)["messages"][0]["content"] for x in (root / "data" / "heldout.jsonl").read_text().splitlines()}
    for name in ("sft.jsonl", "rlvr.jsonl"):
        assert not held & {json.loads(x)["messages"][0]["content"] for x in (root / "data" / name).read_text().splitlines()}
    assert json.loads((root / "summary.json").read_text()) == stages
    assert (root / "report.md").is_file() and (root / "loss-sft.png").is_file()
    again = run_full_demo(str(root), small)
    ran = json.loads((root / "stages.json").read_text())
    assert all(s["skipped"] for s in ran)
    assert [s["seconds"] for s in again[1:]] == [s["seconds"] for s in stages[1:]]  # the times of the real runs
