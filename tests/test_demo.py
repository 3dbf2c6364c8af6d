"""``posttrain demo``: the whole recipe on a tiny model, as shipped, gaining at every post-training stage; a re-run skips every stage."""

import json

from posttrain.cli import main
from posttrain.demo import run_demo


def test_demo_runs_every_stage_and_a_rerun_skips_them(tmp_path):
    small = ["tts.majority=[1,3]"]  # the recipe as shipped (the README's table), majority voting cut to 3
    assert main(["demo", "--output", str(tmp_path / "full")] + small) == 0
    root = tmp_path / "full"
    stages = json.loads((root / "summary.json").read_text())
    assert [s["stage"] for s in stages] == ["base", "midtrain", "anneal", "sft", "dpo", "rlvr", "rlvr + majority@3"]
    assert set(stages[-1]["majority"]) == {"1", "3"} and stages[-1]["heldout_accuracy"] == stages[-1]["majority"]["3"]
    assert stages[3]["tokens"] > 0 and stages[5]["tokens"] > 0
    assert all(0.0 <= s["heldout_accuracy"] <= 1.0 and "add" in s and "mul" in s for s in stages)
    acc = {s["stage"]: s["heldout_accuracy"] for s in stages}
    # the README's gains (measured: SFT +0.28, DPO +0.08, GRPO +0.16), with room for another CPU's rounding
    assert acc["sft"] >= acc["base"] + 0.2 and acc["dpo"] >= acc["sft"] + 0.04 and acc["rlvr"] >= acc["dpo"] + 0.1, acc
    held = {json.loads(x)["messages"][0]["content"] for x in (root / "data" / "heldout.jsonl").read_text().splitlines()}
    for name in ("sft.jsonl", "rlvr.jsonl"):
        assert not held & {json.loads(x)["messages"][0]["content"] for x in (root / "data" / name).read_text().splitlines()}
    assert (root / "report.md").is_file() and (root / "loss-sft.png").is_file()
    # every trained model carries its contamination report, checked against the held-out file
    reports = {name: json.loads((root / name / "manifest.json").read_text())["contamination"]
               for name in ("midtrain", "anneal", "sft", "dpo", "rlvr")}
    assert all(r["against"] == {"verifiable": 100} for r in reports.values())
    assert reports["sft"]["records"] == 200 and reports["rlvr"]["records"] == 400
    assert "## Contamination" in (root / "report.md").read_text()
    assert (root / "summary.png").read_bytes()[:4] == b"\x89PNG" and (root / "tts" / "tts.png").is_file()
    from posttrain.inference.serve import models_of_run  # what `posttrain serve --run` serves

    assert list(models_of_run(str(root))) == ["base", "midtrain", "anneal", "sft", "dpo", "rlvr"]
    assert models_of_run(str(root))["base"] == str(root / "tiny-base")
    again = run_demo(str(root), small)
    ran = json.loads((root / "stages.json").read_text())
    assert all(s["skipped"] for s in ran)
    assert [s["seconds"] for s in again[1:]] == [s["seconds"] for s in stages[1:]]  # the times of the real runs
