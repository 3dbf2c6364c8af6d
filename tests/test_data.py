import gzip
import json

import pytest
from conftest import DATA, write_jsonl

from posttrain.config import DataSource
from posttrain.data.adapters import gsm8k_final_answer, parse_hh_text, to_kind
from posttrain.data.io import read_records
from posttrain.data.mixing import choose, mix
from posttrain.data.records import preference_problem
from posttrain.errors import UserError


def test_gsm8k_adapter_on_the_public_file():
    src = DataSource(path=str(DATA / "gsm8k/train.jsonl"), count=5, license="MIT")
    recs, lineage = mix([src], "sft", seed=0)
    assert len(recs) == 5 and lineage[0]["records_available"] == 7473 and lineage[0]["license"] == "MIT"
    for r in recs:
        user, asst = r["messages"]
        assert user["role"] == "user" and asst["role"] == "assistant"
        assert "<<" not in asst["content"] and asst["content"].splitlines()[-1].startswith("#### ")
        assert r["license"] == "MIT" and r["source"].endswith("train.jsonl")
    first = next(read_records(str(DATA / "gsm8k/train.jsonl")))[0]
    rec = to_kind(first, "verifiable", "auto", "x")
    assert rec["ground_truth"] == "72" and rec["verifier"] == "gsm8k"
    assert to_kind(first, "sft", "gsm8k", "x")["messages"][1]["content"] == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72")
    assert gsm8k_final_answer("so\n#### 1,234") == "1234"


def test_hh_rlhf_gz_to_preference_and_sft():
    path = str(DATA / "hh_rlhf/helpful-base_test.jsonl.gz")
    pairs, _ = mix([DataSource(path=path)], "preference", seed=1)
    problems = [preference_problem(p) for p in pairs]
    # the real file has a few pairs no trainer can use; they are found, not crashed on
    assert len(pairs) == 2354 and problems.count("empty rejected response") == 4 and problems.count("identical sides") == 2
    pairs = [p for p, why in zip(pairs, problems) if why is None]
    for p in pairs:
        assert p["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in p["chosen"]] == ["assistant"]
    raw = json.loads(gzip.open(path, "rt").readline())
    pair = to_kind(raw, "preference", "auto", "x")
    assert pair["prompt"] == [{"role": "user", "content": "Do you know why turkeys became the official food of thanksgiving?"}]
    assert pair["chosen"][0]["content"].startswith("To be honest, I don’t know")
    assert preference_problem(pair) is None
    sft = to_kind(raw, "sft", "auto", "x")
    assert sft["messages"] == pair["prompt"] + pair["chosen"]
    # a chosen conversation that ends in an empty reply trains on the turns before it
    sft = to_kind({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", "rejected": "x"}, "sft", "auto", "x")
    assert sft["messages"] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    records, _ = mix([DataSource(path=path)], "sft", seed=1)
    assert len(records) == 2354


def test_parse_hh_multi_turn():
    turns = parse_hh_text("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d", "w", "chosen")
    assert turns == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(UserError, match="w: field 'chosen' does not start with"):
        parse_hh_text("Human: a", "w", "chosen")


def test_preference_forms_and_problems():
    prompt_form = to_kind({"prompt": "q", "chosen": "good", "rejected": "bad"}, "preference", "auto", "x")
    msgs = lambda a: [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]  # noqa: E731
    conv_form = to_kind({"chosen": msgs("good"), "rejected": msgs("bad")}, "preference", "auto", "x")
    assert prompt_form == conv_form
    list_form = to_kind({"prompt": msgs("x")[:1], "chosen": msgs("good")[1:], "rejected": msgs("bad")[1:]},
                        "preference", "auto", "x")
    assert list_form == conv_form
    same = to_kind({"chosen": msgs("x"), "rejected": msgs("x")}, "preference", "auto", "x")
    assert preference_problem(same) == "identical sides"
    other = {"chosen": msgs("a"), "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}
    assert preference_problem(to_kind(other, "preference", "auto", "x")) == "prompts differ"
    with pytest.raises(UserError, match="'prompt' must end with a user turn"):
        to_kind({"prompt": [{"role": "system", "content": "s"}], "chosen": "a", "rejected": "b"}, "preference", "auto", "x")


def test_json_parquet_and_gz_load_alike(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    loaded = [mix([DataSource(path=str(tmp_path / n))], "sft", 0)[0] for n in ("a.json", "a.parquet", "a.jsonl.gz")]
    assert loaded[0] == [{**r, "source": str(tmp_path / "a.json")} for r in loaded[0]]
    strip = lambda rs: [r["messages"] for r in rs]  # noqa: E731
    assert strip(loaded[0]) == strip(loaded[1]) == strip(loaded[2])
    assert strip(loaded[0])[2] == [{"role": "user", "content": "p2"}, {"role": "assistant", "content": "c2"}]


def test_mixer_counts_fractions_upsampling_and_seed(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(4)])
    srcs = [DataSource(path=str(a), count=3, license="MIT"), DataSource(path=str(b), fraction=2.5, license="CC-BY-4.0")]
    recs, lineage = mix(srcs, "sft", seed=7)
    prompts = [r["messages"][0]["content"] for r in recs]
    assert len(recs) == 3 + 10 and len(set(prompts[:3])) == 3
    b_counts = {p: prompts[3:].count(p) for p in set(prompts[3:])}
    assert sorted(b_counts.values()) == [2, 2, 3, 3]  # every record twice, plus a seeded half
    assert [x["records_used"] for x in lineage] == [3, 10] and [x["license"] for x in lineage] == ["MIT", "CC-BY-4.0"]
    assert {r["license"] for r in recs} == {"MIT", "CC-BY-4.0"}
    assert mix(srcs, "sft", seed=7)[0] == recs
    assert mix(srcs, "sft", seed=8)[0] != recs
    assert choose(5, 0, __import__("random").Random(0)) == []


def test_local_files_take_record_ranges_as_splits(tmp_path):
    path = str(write_jsonl(tmp_path / "r.jsonl", [{"i": i} for i in range(5)] + [""]))  # a blank line is no record
    ids = lambda split: [r["i"] for r, _ in read_records(path, split)]  # noqa: E731
    assert ids("train") == ids("test") == ids("train[:]") == [0, 1, 2, 3, 4]
    assert ids("train[:2]") == [0, 1] and ids("train[3:]") == [3, 4] and ids("train[1:3]") == [1, 2]
    assert [w for _, w in read_records(path, "train[4:]")] == [f"{path}:5"]  # errors still name the real line
    for bad in ("train[-2:]", "train[:50%]", "train[a]"):
        with pytest.raises(UserError, match="record range such as train"):
            list(read_records(path, bad))


def test_self_instruct_tasks_as_sft_records(tmp_path):
    src = DataSource(path=str(DATA / "self_instruct/seed_tasks.jsonl"), license="Apache-2.0")
    recs, _ = mix([src], "sft", seed=0)
    raw = [json.loads(x) for x in (DATA / "self_instruct/seed_tasks.jsonl").read_text().splitlines()]
    assert len(recs) == 175
    for r in recs:
        user, asst = r["messages"]
        task = next(t for t in raw if user["content"].startswith(t["instruction"].strip())
                    and asst["content"] == t["instances"][0]["output"].strip())
        assert user["content"].endswith(task["instances"][0]["input"].strip())
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "Say hi.", "instances": [{"input": "", "output": ""}]}])
    with pytest.raises(UserError, match=r"bad.jsonl:1: field 'instances' needs a first instance"):
        mix([DataSource(path=str(bad))], "sft", seed=0)
