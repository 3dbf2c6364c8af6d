"""``posttrain demo tools``: a tiny model learns to call a Python interpreter for what it cannot compute.

The task is 3-digit multiplication, which a tiny model cannot learn from a few hundred examples. A
tiny Llama and tokenizer are built from scratch; ``posttrain/recipes/demo_tools.yaml`` then trains

- ``sft-direct``: SFT on the problems answered directly (what the model can do alone);
- ``sft``: SFT on the same problems as tool-use trajectories (the model calls ``python`` with the
  product, reads the result, answers; the tool's turn is never trained);
- ``rlvr``: GRPO on other problems, every rollout an episode of the ``python`` environment (one
  sandboxed interpreter per episode), rewarded by the verifier on the final answer;

and evaluates each on held-out problems with the tool (``env: python``) and without it. The table,
``summary.json`` and ``summary.png`` give held-out accuracy with and without the tool, tool calls and
turns per problem, and time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from posttrain.atomic import write_json, write_text
from posttrain.data import tools as tool_format
from posttrain.data.synth import arithmetic as ar
from posttrain.envs.python import PythonEnv
from posttrain.models import build_tiny
from posttrain.pipeline import run
from posttrain.util import log

RECIPE = Path(__file__).parent / "recipes" / "demo_tools.yaml"
SIZES = {"sft": 400, "rlvr": 200, "heldout": 100, "corpus": 6000}


def three_digit_problems(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` distinct pairs of 3-digit operands."""
    pairs = [(a, b) for a, b in ar.problems("mul", 4 * n, digits=3, seed=seed) if a >= 100 and b >= 100]
    if len(pairs) < n:
        raise ValueError(f"only {len(pairs)} 3-digit pairs drawn, asked for {n}")
    return pairs[:n]


def corpus_text(record: dict) -> str:
    """Mid-training text of a trajectory: its turns as the tulu template writes them, without the
    end-of-turn token (which would end the document)."""
    parts = []
    for m in record["messages"]:
        if m["role"] == "tool":
            parts.append(f"<|user|>\n<tool_response>\n{m['content']}\n</tool_response>\n")
        elif m.get("tool_calls"):
            fn = m["tool_calls"][0]["function"]
            parts.append(f"<|assistant|>\n{tool_format.call_text(fn['name'], fn['arguments'])}\n")
        else:
            parts.append(f"<|{m['role']}|>\n{m['content']}\n")
    return "".join(parts)


def tool_trajectory(env: PythonEnv, a: int, b: int) -> dict:
    """The SFT record of an episode that calls the tool: the environment's prompt, the call, its result,
    the answer."""
    start = env.reset(ar.rlvr_record("mul", a, b))
    product = str(a * b)
    call = {"type": "function", "function": {"name": "python", "arguments": {"code": f"print({a} * {b})"}}}
    messages = start.messages + [{"role": "assistant", "content": "", "tool_calls": [call]},
                                 {"role": "tool", "name": "python", "content": product},
                                 {"role": "assistant", "content": product}]
    return {"messages": messages, "tools": start.tools, "source": "synthetic/mul-tool", "license": ar.LICENSE}


def write_data(root: Path) -> list[str]:
    """The data files; returns texts the tiny tokenizer is trained on."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    pairs = three_digit_problems(sum(SIZES.values()))
    held, rest = pairs[:SIZES["heldout"]], pairs[SIZES["heldout"]:]
    sft, rl, corpus = rest[:SIZES["sft"]], rest[SIZES["sft"]:SIZES["sft"] + SIZES["rlvr"]], rest[SIZES["sft"] + SIZES["rlvr"]:]
    ar.check_disjoint([ar.question("mul", a, b) for a, b in sft + rl + corpus],
                      [ar.question("mul", a, b) for a, b in held])
    env = PythonEnv(system_prompt="", list_tools=False)  # as the recipe's env_args
    write_text(data / "corpus.jsonl", "".join(json.dumps({"text": corpus_text(tool_trajectory(env, a, b))}) + "\n"
                                              for a, b in corpus))
    files = {"sft_tools.jsonl": [tool_trajectory(env, a, b) for a, b in sft],
             "sft_direct.jsonl": [ar.sft_record("mul", a, b, worked=False) for a, b in sft],
             "rlvr.jsonl": [ar.rlvr_record("mul", a, b) for a, b in rl],
             "heldout.jsonl": [ar.rlvr_record("mul", a, b) for a, b in held]}
    for name, recs in files.items():
        write_text(data / name, "".join(json.dumps(r) + "\n" for r in recs))
    return [corpus_text(r) for r in files["sft_tools.jsonl"]]


def accuracy(eval_dir: Path) -> dict:
    results = json.loads((eval_dir / "results.json").read_text())["results"]["verifiable"]
    return {k: results[k] for k in ("accuracy", "turns", "tool_calls", "tool_errors") if k in results}


def plot_summary(rows: list[dict], path: Path) -> None:
    from posttrain.eval import plots

    fig, ax = plots.figure()
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["with_tool"] or 0 for r in rows], width=0.4, label="with the python tool")
    ax.bar([x + 0.2 for x in xs], [r["without_tool"] for r in rows], width=0.4, label="without it")
    ax.set_xticks(list(xs), [r["stage"] for r in rows])
    ax.set_ylabel("held-out accuracy (3-digit multiplication)")
    ax.set_title("posttrain demo tools")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    plots.save(fig, path)


def run_tools_demo(out: str = "runs/demo-tools", overrides: list[str] | tuple[str, ...] = ()) -> list[dict]:
    started = time.time()
    root = Path(out)
    texts = write_data(root)
    base = root / "tiny-base"
    if not (base / "config.json").exists():
        build_tiny(base, texts, vocab_size=400, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, seed=0,
                   split_words=False)
        log(f"demo tools: built a tiny Llama and tokenizer at {base}")
    recipe = root / "recipe.yaml"
    write_text(recipe, RECIPE.read_text().replace("{out}", str(root)))
    summary = {e["stage"]: e for e in run(recipe, list(overrides))}
    rows = []
    for stage, with_tool, without in (("sft-direct", None, "eval-sft-direct"), ("sft", "eval-sft", "eval-sft-no-tool"),
                                      ("rlvr", "eval-rlvr", "eval-rlvr-no-tool")):
        tool = accuracy(Path(summary[with_tool]["output_dir"])) if with_tool else {}
        alone = accuracy(Path(summary[without]["output_dir"]))
        rows.append({"stage": stage, "with_tool": tool.get("accuracy"), "without_tool": alone["accuracy"],
                     "tool_calls": tool.get("tool_calls"), "turns": tool.get("turns"),
                     "seconds": round(summary[stage]["seconds"], 1)})
    write_json(root / "summary.json", rows)
    plot_summary(rows, root / "summary.png")
    print(f"\n{'stage':12}{'with tool':>11}{'without':>9}{'calls':>7}{'turns':>7}{'seconds':>9}")
    for r in rows:
        cell = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{r['stage']:12}{cell(r['with_tool']):>11}{cell(r['without_tool']):>9}{cell(r['tool_calls']):>7}"
              f"{cell(r['turns']):>7}{r['seconds']:>9}")
    final = rows[-1]
    print(f"\nheld-out accuracy with the tool {final['with_tool']:.2f}, without it {final['without_tool']:.2f} "
          f"(the direct-answer model: {rows[0]['without_tool']:.2f}); {round(time.time() - started, 1)} s; "
          f"table in {root / 'summary.json'}, plot in {root / 'summary.png'}")
    return rows
