"""``bench/gpu_check.py --device cpu --tiny``: the command meant for the first GPU, in the mode this CPU
can run: SFT, DPO and GRPO beside TRL and FSDP on 2 processes, one table and its JSON, under 2 minutes."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_on_a_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--output", str(tmp_path / "check.json")], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "check.json").read_text())["rows"]
    assert [(r["stage"], r["side"]) for r in rows] == [("sft", "posttrain"), ("sft", "trl"), ("dpo", "posttrain"),
                                                       ("dpo", "trl"), ("grpo", "posttrain"), ("grpo", "trl"),
                                                       ("sft-fsdp", "posttrain x2")]
    assert all(r["speed"] > 0 and r["peak_mib"] > 0 for r in rows)
    assert all(r["ratio"] > 0 for r in rows if r["side"] == "posttrain" and r["stage"] != "sft-fsdp")
    assert "| tiny | sft | posttrain |" in proc.stdout and "MFU" in proc.stdout
    seconds = float(re.search(r"; (\d+) s in all", proc.stdout).group(1))  # from its start to its table
    assert seconds < 120, seconds
