"""Decontamination: the indexed check equals a brute-force computation of every overlap, on a few
thousand records built to overlap evaluation items by every amount; the command's report, clean copy
and manifest; errors that name the record."""

import json
import random
import re

import pytest
from conftest import DATA, write_jsonl

from posttrain.cli import main
from posttrain.data.decontam import NgramIndex, check_texts, decontaminate, prompt_text
from posttrain.eval.instances import eval_instances
from posttrain.errors import UserError


def brute_force(eval_texts: list[tuple[str, int, str]], train_texts: list[str], n: int, threshold: float):
    """(task, index, overlap) of the best-overlapping evaluation item per training text, or None."""
    def words(t):
        return re.findall(r"[^\W_]+", t.lower())

    def grams(ws, k):
        return {tuple(ws[i:i + k]) for i in range(len(ws) - k + 1)} if len(ws) >= k else ({tuple(ws)} if ws else set())

    evals = [(task, idx, grams(words(t), n)) for task, idx, t in eval_texts if len(words(t)) >= min(n, 4)]
    lengths = {len(next(iter(g))) for _, _, g in evals if g} | {n}
    out = []
    for text in train_texts:
        ws = words(text)
        mine = set().union(*(grams(ws, k) if len(ws) >= k else set() for k in lengths))
        best = None
        for task, idx, g in evals:
            overlap = len(g & mine) / len(g)
            if overlap >= threshold and (best is None or overlap > best[2]):
                best = (task, idx, overlap)
        out.append(best)
    return out


@pytest.fixture(scope="module")
def contaminated(tmp_path_factory):
    """300 GSM8K questions as the 'evaluation set' (plus a few short items), and 3,000 training
    prompts: 2,000 other questions and 1,000 that copy a random span of an evaluation question, some
    with words changed and text around them."""
    root = tmp_path_factory.mktemp("decontam")
    rows = [json.loads(x) for x in (DATA / "gsm8k" / "train.jsonl").read_text().splitlines()]
    evals, rest = rows[:300], rows[300:2300]
    short = [{"problem": p, "answer": "1"} for p in ("Compute 7 + 5.", "Evaluate the sum of all odd primes",
                                                     "What is 2 plus 2?", "Yes.")]
    rng = random.Random(0)
    train = [r["question"] for r in rest]
    for i in range(1000):
        ws = rng.choice(evals)["question"].split()
        a = rng.randrange(len(ws))
        b = rng.randrange(a, len(ws)) + 1
        span = ws[a:b] if rng.random() < 0.7 else ws
        if rng.random() < 0.4:
            span = [w if rng.random() > 0.1 else "zzz" for w in span]
        train.append(" ".join(["Please", "answer:"] * (i % 2) + span + ["Thanks."] * (i % 3 == 0)))
    train += ["Can you compute 7 + 5. quickly", "what is 2 plus 2", "Yes. Evaluate the sum of all odd primes!"]
    rng.shuffle(train)
    files = {"gsm8k": write_jsonl(root / "eval_gsm8k.jsonl", evals), "math500": write_jsonl(root / "short.jsonl", short),
             "train": write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "messages": [{"role": "user", "content": t}]}
                                                          for i, t in enumerate(train)])}
    return files, train, [("gsm8k", i, r["question"]) for i, r in enumerate(evals)] + \
        [("math500", i, s["problem"]) for i, s in enumerate(short)]


@pytest.mark.parametrize("n,threshold", [(8, 0.5), (8, 0.2), (5, 0.8), (13, 1.0)])
def test_index_equals_brute_force(contaminated, n, threshold):
    files, train, eval_texts = contaminated
    index = NgramIndex(n)
    for inst in eval_instances([f"gsm8k={files['gsm8k']}", f"math500={files['math500']}"]):
        index.add(inst)
    got = check_texts(index, train, threshold, workers=1)
    want = brute_force(eval_texts, train, n, threshold)
    assert [(m.task, m.index, m.overlap) if m else None for m in got] == \
        [(w[0], w[1], round(w[2], 6)) if w else None for w in want]
    flagged = sum(w is not None for w in want)
    assert 100 < flagged < 1100  # the set exercises both sides of the threshold
    assert got == check_texts(index, train, threshold, workers=2, chunk=500)  # forked workers agree


def test_exact_mode_flags_only_whole_evaluation_items(contaminated):
    files, train, eval_texts = contaminated
    index = NgramIndex(8)
    for inst in eval_instances([f"gsm8k={files['gsm8k']}", f"math500={files['math500']}"]):
        index.add(inst)
    got = check_texts(index, train, mode="exact")
    norm = {i: " ".join(re.findall(r"[^\W_]+", t.lower())) for i, (_, _, t) in enumerate(eval_texts)}
    norm = {i: t for i, t in norm.items() if len(t.split()) >= 4}  # "Yes." is too short to check
    for text, m in zip(train, got):
        whole = " " + " ".join(re.findall(r"[^\W_]+", text.lower())) + " "
        contained = [k for k, e in norm.items() if f" {e} " in whole]
        assert (m is not None) == bool(contained)
        if m is not None:
            assert m.overlap == 1.0
    assert any(m and m.task == "math500" for m in got)  # short items are found inside longer prompts


def test_command_report_clean_copy_and_manifest(contaminated, tmp_path):
    files, train, _ = contaminated
    out = tmp_path / "out"
    code = main(["data", "decontaminate", "--train", str(files["train"]), str(DATA / "self_instruct" / "seed_tasks.jsonl"),
                 "--against", f"gsm8k={files['gsm8k']},math500={files['math500']}", "--output", str(out), "--remove"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    src = report["summary"]["sources"][str(files["train"])]
    mine = [f for f in report["flagged"] if f["source"] == str(files["train"])]
    assert src["records"] == len(train) and src["flagged"] == len(mine)
    assert src["percent"] == round(100 * src["flagged"] / len(train), 3) and src["examples"]
    entry = report["flagged"][0]
    assert {"source", "index", "id", "matched_task", "matched_index", "overlap"} <= set(entry)
    assert entry["overlap"] >= 0.5
    manifest = json.loads((out / "manifest.json").read_text())
    clean = manifest["sources"][str(files["train"])]["clean_file"]
    kept = [json.loads(x) for x in open(clean)]
    assert len(kept) == len(train) - src["flagged"]
    removed = {r["id"] for r in manifest["sources"][str(files["train"])]["removed"]}
    assert removed.isdisjoint(r["id"] for r in kept) and len(removed) == src["flagged"]


def test_prompt_text_reads_every_format_and_names_a_bad_record(tmp_path):
    assert prompt_text({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "x") == "a"
    assert prompt_text({"chosen": "\n\nHuman: hi there\n\nAssistant: hello"}, "x") == "hi there"
    assert prompt_text({"instruction": "Do it.", "instances": [{"input": "data", "output": "o"}]}, "x") == "Do it.\ndata"
    assert prompt_text({"prompt": "p", "chosen": "c", "rejected": "r"}, "x") == "p"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "ok"}]}, {"text": "no prompt"}])
    with pytest.raises(UserError, match=r"bad.jsonl:2: no user text found.*fields present: text"):
        against = [f"math500={DATA / 'math' / 'math500_dev.jsonl'}"]
        decontaminate([str(bad)], against, eval_instances(against), tmp_path / "o")
    assert not (tmp_path / "o" / "report.json").exists()
