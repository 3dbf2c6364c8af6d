"""``posttrain demo tools`` end to end (about 4 minutes here): the tiny model cannot multiply 3-digit
numbers alone (held-out accuracy 0), and with the python tool it answers most held-out problems."""

from posttrain.demo_tools import run_tools_demo


def test_the_tools_demo_learns_to_call_python(tmp_path):
    rows = {r["stage"]: r for r in run_tools_demo(str(tmp_path / "demo"))}
    assert rows["sft-direct"]["without_tool"] == 0.0  # measured: 0.00 (the direct-answer model)
    sft, rl = rows["sft"], rows["rlvr"]
    assert sft["without_tool"] == rl["without_tool"] == 0.0  # a call that is never answered scores nothing
    assert sft["with_tool"] >= 0.78  # measured 0.82 (100 held-out problems)
    assert rl["with_tool"] - rl["without_tool"] >= 0.6  # the bar; measured 0.82
    assert rl["with_tool"] >= sft["with_tool"] - 0.02  # measured: equal (RL gained no greedy accuracy)
    assert rl["tool_calls"] == 1.0 and rl["turns"] == 2.0
    assert (tmp_path / "demo" / "summary.png").stat().st_size > 0
