"""Data curation commands: self-consistency voting, the judged preference pipeline, s1 selection,
self-instruct and persona synthesis. Model behaviour is scripted (an engine whose answer is a
function of the prompt) so every count can be checked; the same commands then run end to end
against a real HTTP server with injected faults (interrupted and resumed) and on a local tiny model."""

import json
import re

import pytest
from conftest import DATA, write_jsonl
from faults import Faulty

from posttrain.cli import main
from posttrain.data.synth import persona, preferences, select, self_instruct, selfconsistency
from posttrain.errors import UserError
from posttrain.inference.engine import Completion, SamplingParams
from posttrain.inference.open import CachedEngine
from posttrain.rewards import get_verifier


class Scripted:
    """An engine answering ``reply(user_text, sample_index, sampling)`` for each prompt and sample."""

    def __init__(self, reply):
        self.reply, self.calls = reply, 0

    def generate(self, prompts, sampling=None):
        sampling = sampling or SamplingParams()
        self.calls += 1
        out = []
        for i, p in enumerate(prompts):
            text = p if isinstance(p, str) else p[-1]["content"]
            for k in range(sampling.n):
                out.append(Completion(self.reply(text, k, sampling), [], "stop", i))
        return out


def start(engine, faults=None):
    server = Faulty(engine, "scripted", faults, delay=2.0)
    return server, f"openai:scripted@{server.url}/v1"


# --- rejection sampling -------------------------------------------------------------------------

def test_rejection_sampling_keeps_the_best_finished_verified_responses(tmp_path):
    from posttrain.data.synth.rejection import rejection_sample

    no_comma = {"instruction_id_list": ["punctuation:no_comma", "startend:end_checker"],
                "kwargs": [{}, {"end_phrase": "Bye."}]}
    prompts = [{"messages": [{"role": "user", "content": "Say hi without commas and end with Bye."}],
                "ground_truth": no_comma, "verifier": "ifeval", "id": "a"},
               {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "ground_truth": "4", "verifier": "gsm8k"}]
    replies = {0: ["Hi, there. Bye.", "Hi there. Bye.", "Hi there friend. Bye.", "Hi there"],  # 0.5, 1, 1, 0.5
               1: ["#### 5", "#### 4", "#### 4", "#### 3"]}

    class Engine(Scripted):
        def generate(self, prompts, sampling=None):
            out = super().generate(prompts, sampling)
            if len(out) == 8:
                out[7] = Completion("#### 4 and more", [], "length", 1)  # right but cut by the limit: never kept
            return out

    engine = Engine(lambda text, k, s: replies[0 if "hi" in text else 1][k])
    records, stats = rejection_sample(engine, prompts, samples=4, per_prompt=2)
    assert [(r["messages"][-1]["content"], r["score"]) for r in records] == \
        [("Hi there. Bye.", 1.0), ("Hi there friend. Bye.", 1.0), ("#### 4", 1.0), ("#### 4", 1.0)]
    assert records[0]["id"] == "a" and stats["unfinished"] == 1 and stats["kept_prompts"] == 2
    assert stats["by_verifier"]["ifeval"]["mean_score"] == 0.75 and stats["by_verifier"]["gsm8k"]["mean_score"] == 0.75
    half, _ = rejection_sample(Engine(lambda text, k, s: replies[0 if "hi" in text else 1][k]), prompts[:1], 4,
                               min_score=0.5, per_prompt=3)
    assert [r["score"] for r in half] == [1.0, 1.0, 0.5]
    with pytest.raises(UserError, match="prompt 0 .*needs 'ground_truth'"):
        rejection_sample(engine, [{"messages": prompts[0]["messages"], "ground_truth": None, "verifier": None}])


# --- self-consistency ---------------------------------------------------------------------------

def test_majority_vote_groups_equal_answers_and_keeps_agreeing_solutions():
    recs = [
        {"messages": [{"role": "user", "content": "q1"}], "verifier": "gsm8k", "ground_truth": "72",
         "solutions": [{"text": "... #### 72", "answer": "72"}, {"text": "#### 72.0", "answer": "72.0"},
                       {"text": "#### 71", "answer": "71"}, {"text": "no idea", "answer": None}]},
        {"messages": [{"role": "user", "content": "q2"}], "verifier": "gsm8k", "ground_truth": "5",
         "solutions": [{"text": "#### 4", "answer": "4"}, {"text": "#### 5", "answer": "5"},
                       {"text": "#### 6", "answer": "6"}, {"text": "#### 7", "answer": "7"}]},
        {"messages": [{"role": "user", "content": "q3"}], "verifier": "math", "ground_truth": None,
         "solutions": [{"text": "\\boxed{\\frac{1}{2}}", "answer": "\\frac{1}{2}"}, {"text": "\\boxed{0.5}", "answer": "0.5"},
                       {"text": "\\boxed{2}", "answer": "2"}]},
    ]
    sft, rlvr, stats = selfconsistency.vote(recs, min_agreement=0.5)
    assert stats["kept_prompts"] == 2 and stats["kept_solutions"] == 4 and stats["solutions"] == 11
    assert [r["messages"][-1]["content"] for r in sft] == ["... #### 72", "#### 72.0", "\\boxed{\\frac{1}{2}}", "\\boxed{0.5}"]
    assert [r["agreement"] for r in rlvr] == [0.5, 0.6667]
    assert rlvr[1]["ground_truth"] == "\\frac{1}{2}"  # the majority answer becomes the ground truth
    assert stats["majority_correct_kept"] == 1 and stats["dropped_with_truth"] == 1
    _, rlvr, _ = selfconsistency.vote(recs, min_agreement=0.6)
    assert len(rlvr) == 1  # q1's 2/4 no longer passes
    with pytest.raises(UserError, match="record 0: field 'solutions'"):
        selfconsistency.vote([{"messages": [], "verifier": "gsm8k"}])


def test_solve_then_selfconsistency_commands_on_a_scripted_endpoint(tmp_path, capsys):
    def reply(text, k, sampling):  # right 3 times in 4 on even questions, scattered on odd ones
        k += sampling.seed  # through the endpoint each sample is a request of its own, seed = seed + sample
        n = int(re.search(r"q(\d+)", text).group(1))
        return f"Step by step.\n#### {n * 10 if (n % 2 == 0 and k != 3) else n * 10 + k}"

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question": f"q{i}?", "answer": f"x #### {i * 10}"} for i in range(6)])
    server, spec = start(Scripted(reply))
    try:
        assert main(["data", "solve", "--prompts", str(prompts), "--engine", spec, "--samples", "4",
                     "--output", str(tmp_path / "sol")]) == 0
    finally:
        server.close()
    assert "data solve (engine): 100%" in capsys.readouterr().err  # progress with ETA on stderr
    solved = [json.loads(x) for x in (tmp_path / "sol" / "records.jsonl").read_text().splitlines()]
    assert [len(r["solutions"]) for r in solved] == [4] * 6 and solved[0]["ground_truth"] == "0"
    assert solved[0]["solutions"][0]["answer"] == "0" and solved[1]["solutions"][3]["answer"] == "13"
    assert main(["data", "selfconsistency", "--in", str(tmp_path / "sol" / "records.jsonl"), "--min-agreement", "0.5",
                 "--output", str(tmp_path / "sc")]) == 0
    report = json.loads((tmp_path / "sc" / "report.json").read_text())["stats"]
    assert report["kept_prompts"] == 3 and report["kept_solutions"] == 9 and report["majority_correct_kept"] == 3
    assert report["kept_prompt_fraction"] == 0.5
    rlvr = [json.loads(x) for x in (tmp_path / "sc" / "rlvr.jsonl").read_text().splitlines()]
    assert all(get_verifier(r["verifier"])(f"#### {r['ground_truth']}", r["ground_truth"]) == 1.0 for r in rlvr)


# --- preferences --------------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ('{"helpfulness": 4, "instruction_following": 5, "truthfulness": 3, "honesty": 4}', [4, 5, 3, 4]),
    ('Sure! Here you go:\n```json\n{"Helpfulness": 2, "Instruction Following": 2, "truthfulness": 5, "honesty": 1}\n```',
     [2, 2, 5, 1]),
    ("Helpfulness: 4/5\nInstruction following - 3\nTruthfulness: 5\nHonesty: 4", [4, 3, 5, 4]),
    ('{"helpfulness": 9, "instruction_following": 5, "truthfulness": 3, "honesty": 4}', None),
    ("I think it is good.", None),
    ('{"helpfulness": 4, "truthfulness": 3}', None),
    ('{"helpfulness": true, "instruction_following": 5, "truthfulness": 3, "honesty": 4}', None),
])
def test_judge_output_parsing(text, want):
    got = preferences.parse_ratings(text)
    assert (None if got is None else [got[a] for a in preferences.ASPECTS]) == want


def _judge(text, k, sampling):
    """Rates a response by the number in it: 'answer N' gets helpfulness N; some replies are garbage."""
    response = text.split("[Assistant response]\n", 1)[1].split("\n\nReply with", 1)[0]
    if "garbage" in response:
        return "I refuse to rate this."
    n = int(re.search(r"answer (\d)", response).group(1))
    return json.dumps({"helpfulness": n, "instruction_following": n, "truthfulness": 5, "honesty": 5})


def test_pairs_take_the_best_and_a_lower_rated_response_and_count_ties_and_garbage():
    prompts = [{"messages": [{"role": "user", "content": f"p{i}"}]} for i in range(4)]
    strong = Scripted(lambda t, k, s: "answer 5" if t != "p3" else "answer 3")
    weak = Scripted(lambda t, k, s: {"p0": "answer 2", "p1": "garbage", "p2": "answer 5", "p3": "answer 3"}[t])
    onpol = Scripted(lambda t, k, s: "answer 1" if t != "p3" else "answer 3")
    pairs, judged, stats = preferences.build_pairs(prompts, {"strong": strong, "weak": weak}, Scripted(_judge),
                                                   ("onpolicy", onpol))
    assert stats == {"prompts": 4, "responses": 12, "unparseable": 1, "ties": 1, "too_few_rated": 0, "empty_responses": 0,
                     "pairs": 3}
    by_prompt = {p["prompt"][0]["content"]: p for p in pairs}
    assert by_prompt["p0"]["chosen_model"] == "strong" and by_prompt["p0"]["rejected_model"] in ("weak", "onpolicy")
    assert by_prompt["p1"]["chosen_model"] == "strong" and by_prompt["p1"]["rejected_model"] == "onpolicy"
    assert by_prompt["p2"]["chosen_model"] in ("strong", "weak") and by_prompt["p2"]["rejected_model"] == "onpolicy"
    assert by_prompt["p0"]["chosen_rating"] == 5.0 and by_prompt["p0"]["chosen"][0]["content"] == "answer 5"
    assert "p3" not in by_prompt  # every response rated 3: a tie
    assert sum(j["ratings"] is None for j in judged) == 1
    again, _, _ = preferences.build_pairs(prompts, {"strong": strong, "weak": weak}, Scripted(_judge), ("onpolicy", onpol))
    assert again == pairs  # seeded


def test_preferences_command_survives_faults_and_an_interrupted_run_resends_nothing(tmp_path):
    a = Scripted(lambda t, k, s: f"answer {1 + len(t) % 5}")
    b = Scripted(lambda t, k, s: f"answer {1 + (len(t) + 2) % 5}")
    judge = Scripted(_judge)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Question number {i}" + "?" * i} for i in range(6)])
    a_server, a_spec = start(a, faults=[429, 500, "timeout", "drop", "garbage", 503])
    b_server, b_spec = start(b)
    j_server, j_spec = start(judge, faults=[None] * 4 + [500] * 50)  # answers 4 judgments, then fails for good
    pool = tmp_path / "pool.yaml"
    pool.write_text(f"models:\n  - {{name: a, engine: '{a_spec}'}}\n  - {{name: b, engine: '{b_spec}'}}\n")
    cmd = ["data", "preferences", "--prompts", str(prompts), "--pool", str(pool), "--judge", j_spec,
           "--output", str(tmp_path / "out"), "--retries", "1", "--temperature", "0"]
    try:
        assert main(cmd) == 2  # the judge gave up
        assert not (tmp_path / "out" / "records.jsonl").exists()
        assert (a_server.served["completions"], b_server.served["completions"], j_server.served["completions"]) == (6, 6, 4)
        j_server.close()
        j_server, j_spec2 = start(judge)
        assert main(cmd[:7] + [j_spec2] + cmd[8:]) == 0
        assert (a_server.served["completions"], b_server.served["completions"]) == (6, 6)  # all from the cache
        assert j_server.served["completions"] == 12 - 4  # only the judgments that had not arrived
    finally:
        for server in (a_server, b_server, j_server):
            server.close()
    pairs = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    stats = json.loads((tmp_path / "out" / "report.json").read_text())["stats"]
    assert stats["pairs"] == len(pairs) == 6 and stats["ties"] == 0 and stats["unparseable"] == 0
    for p in pairs:
        assert p["chosen_rating"] > p["rejected_rating"]
        assert p["chosen"][0]["content"] == f"answer {int(p['chosen_rating'] * 4 - 10) // 2}"
    assert len((tmp_path / "out" / "judgments.jsonl").read_text().splitlines()) == 12
    from posttrain.config import DataSource
    from posttrain.data.mixing import load_source

    records, _ = load_source(DataSource(path=str(tmp_path / "out" / "records.jsonl")), "preference")
    assert len(records) == 6 and records[0]["chosen"][0]["role"] == "assistant"  # ready for posttrain dpo


# --- s1 selection -------------------------------------------------------------------------------

def test_quality_filters_name_what_they_removed():
    ok = {"question": "What is 2+3?", "solution": "2+3=5", "answer": "5"}
    assert select.quality_problem(ok) is None
    assert select.quality_problem({**ok, "question": ""}) == "missing question"
    assert select.quality_problem({**ok, "solution": ""}) == "missing trace"
    assert select.quality_problem({**ok, "answer": None}) == "missing answer"
    assert select.quality_problem({**ok, "question": "In the figure below, find x. [asy]draw((0,0));[/asy]"}) == "image reference"
    assert select.quality_problem({**ok, "question": "See diagram.png and find x"}) == "image reference"
    assert select.quality_problem({**ok, "solution": "+----------+\n|  box  |"}) == "formatting artifact"
    assert select.quality_problem({**ok, "question": "Find $\\frac{x}{2} if x^2=4"}) == "formatting artifact"
    assert select.quality_problem({**ok, "question": "A pen costs $5. How much do 3 pens cost?"}) is None


def test_selection_drops_easy_questions_and_spreads_over_domains_preferring_long_traces():
    recs = [{"question": f"What is {i} * 3?", "solution": "word " * (10 + i), "answer": str(3 * i), "verifier": "gsm8k",
             "domain": "a" if i < 30 else "b"} for i in range(40)]
    def easy_reply(text, k, sampling):  # right exactly on the questions with a 7 in them
        n = int(re.search(r"What is (\d+)", text).group(1))
        return f"#### {3 * n}" if "7" in text else "#### -1"

    easy = Scripted(easy_reply)
    chosen, report = select.select(recs, 10, difficulty={"easy": easy}, domain_field="domain", seed=0)
    assert report["difficulty"] == {"solved by easy": 4} and report["after_difficulty"] == 36  # 7, 17, 27, 37
    assert sum(report["diversity"]["per_domain_selected"].values()) == 10 and len(chosen) == 10
    # domains are drawn uniformly: domain b holds 9 of 36 records but gets about half the picks
    kept = [r for r in recs if "7" not in r["question"]]
    share = [sum(kept[i]["domain"] == "b" for i in select.diverse_sample(kept, [r["domain"] for r in kept], 10, seed=s))
             for s in range(200)]
    assert 0.45 < sum(share) / 2000 < 0.55
    assert not any("7" in r["question"] for r in chosen)
    # within a domain, rank r is drawn with probability proportional to 2^-r: the longest trace dominates
    firsts = [select.diverse_sample(recs[:30], ["a"] * 30, 1, seed=s)[0] for s in range(400)]
    assert 0.4 < firsts.count(29) / 400 < 0.6 and 0.15 < firsts.count(28) / 400 < 0.35
    labels = select.label_domains(recs[:3], Scripted(lambda t, k, s: "Number theory." if "1" in t else "cooking"))
    assert labels == ["other", "number theory", "other"]


# --- self-instruct ------------------------------------------------------------------------------

def test_self_instruct_parses_filters_and_writes_instances(tmp_path):
    seeds = [json.loads(x) for x in (DATA / "self_instruct" / "seed_tasks.jsonl").read_text().splitlines()]
    fresh = ["Explain why volcanoes erupt to a curious ten year old", "List three common mistakes in filing small business taxes",
             "Suggest a weekly schedule for baking sourdough bread at home", "Compare two chess openings for beginners",
             "Summarize how jazz spread from New Orleans to Chicago", "Give advice for sleeping well before an exam",
             "Describe the animals found in rocky tide pools", "Estimate the load a wooden footbridge must carry",
             "Recommend materials to put in a garden compost heap", "Tell me how glaciers carve valleys over time",
             "Pick fonts that pair well for a wedding invitation", "Outline the first year of keeping honey bees"]

    def reply(text, k, sampling):
        if text.startswith("Instruction:"):
            return "Input: None\nOutput: A fine answer." if "glaciers" not in text else "no format"
        t = fresh[(sampling.seed * 4 + len(text)) % len(fresh)]
        return f" {t}.\n10. Draw a picture of it.\n11. {t}!\n12. Ok"

    engine = Scripted(reply)
    records, stats = self_instruct.bootstrap(seeds[:20], engine, n=5, generator="scripted", batch=4)
    assert stats["instructions"] == 5 and stats["rejected_form"] >= stats["rounds"] * 4  # pictures and 'Ok'
    assert stats["rejected_rouge"] > 0  # the repeated poem line
    texts = [r["instruction"] for r in records]
    assert len(set(texts)) == len(texts) and all("picture" not in t for t in texts)
    rouge = self_instruct.RougeFilter([s["instruction"] for s in seeds[:20]] + texts[:-1])
    assert all(rouge.best(t) < 0.7 for t in texts[-1:])
    assert records[0]["instances"] == [{"input": "", "output": "A fine answer."}]
    assert records[0]["messages"][-1] == {"role": "assistant", "content": "A fine answer."}
    assert self_instruct.parse_instance("Sentence: x\nOutput: y") == {"input": "Sentence: x", "output": "y"}
    assert self_instruct.parse_instance("no format") == {"input": "", "output": "no format"}
    assert self_instruct.parse_instance("Input: a\nOutput:  ") is None
    assert self_instruct.parse_items(" 1. 2. Restarted list here.", 9) == ["Restarted list here."]
    assert self_instruct.parse_items(" First task here.\n10) Second task here.\nrandom", 9) == \
        ["First task here.", "Second task here."]


# --- persona ------------------------------------------------------------------------------------

def test_persona_prompts_carry_provenance_verifiable_constraints_and_no_near_duplicates():
    personas = [json.loads(x)["persona"] for x in open(persona.__file__.replace("synth/persona.py", "examples/personas.jsonl"))]
    dup = "Write a detailed letter to my team explaining the new schedule for the spring season and the reasons behind it"

    def reply(text, k, sampling):
        who = text.split("Persona: ", 1)[1]
        if "chef" in who:
            return f"Here's a possible request:\n\nAs {who.lower()}, plan my week."
        return dup if "nurse" in who or "farmer" in who else f"Request: As {who.lower()}, explain your daily work."

    records, stats = persona.synthesize(personas, "ifeval", Scripted(reply), 24, "scripted", "Apache-2.0")
    assert stats["near_duplicates"] == 1 and stats["records"] == 23
    for r in records:
        assert r["persona"] in personas and r["template"] == "ifeval/0" and r["generator"] == "scripted"
        assert r["generator_license"] == "Apache-2.0" and r["verifier"] == "ifeval"
        assert r["messages"][0]["content"].startswith(("As ", "Write a detailed"))  # lead-ins and labels removed
        get_verifier("ifeval")("anything", r["ground_truth"])  # the verifier accepts the ground truth
    assert {len(r["ground_truth"]["instruction_id_list"]) for r in records} == {1, 2, 3}
    for r in records:  # constraints drawn before the request exists: none that need its words
        assert "combination:repeat_prompt" not in r["ground_truth"]["instruction_id_list"]
    gt = {"instruction_id_list": ["punctuation:no_comma", "startend:end_checker"],
          "kwargs": [{}, {"end_phrase": "Is there anything else I can help with?"}]}
    assert get_verifier("ifeval")("Fine. Is there anything else I can help with?", gt) == 1.0
    assert persona.near_duplicates(["a b c d e f g h", "a b c d e f g h", "totally different words here now"]) == \
        [False, True, False]


# --- a local tiny model as the engine; resumable chunks -----------------------------------------

def test_cached_local_engine_resumes_with_identical_results(tmp_path):
    calls = []

    class Flaky(Scripted):
        def generate(self, prompts, sampling=None):
            calls.append(len(prompts))
            if len(calls) == 3 and fail:
                raise KeyboardInterrupt
            return super().generate(prompts, sampling)

    inner = Flaky(lambda t, k, s: f"{t}:{s.seed}:{k}")
    prompts = [f"p{i}" for i in range(10)]
    fail = True
    with pytest.raises(KeyboardInterrupt):
        CachedEngine(inner, tmp_path / "c", "m", chunk=3).generate(prompts, SamplingParams(n=2, seed=5))
    fail = False
    engine = CachedEngine(inner, tmp_path / "c", "m", chunk=3)
    got = engine.generate(prompts, SamplingParams(n=2, seed=5))
    assert engine.stats == {"chunks_generated": 2, "chunks_cached": 2} and calls[3:] == [3, 1]
    fresh = CachedEngine(Scripted(inner.reply), tmp_path / "other", "m", chunk=3).generate(prompts, SamplingParams(n=2, seed=5))
    assert [(c.text, c.prompt_index) for c in got] == [(c.text, c.prompt_index) for c in fresh]
    assert got[-1].prompt_index == 9 and got[-1].text == "p9:8:1"  # the last chunk (index 3) is sampled with seed 5 + 3


def test_commands_end_to_end_on_a_local_tiny_model(tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(4)])
    base = ["--engine", str(tiny_model_dir), "--max-new-tokens", "8", "--batch-size", "8"]
    assert main(["data", "solve", "--prompts", str(prompts), "--samples", "3", "--output", str(tmp_path / "s")] + base) == 0
    first = (tmp_path / "s" / "records.jsonl").read_text()
    assert main(["data", "solve", "--prompts", str(prompts), "--samples", "3", "--output", str(tmp_path / "s")] + base) == 0
    assert (tmp_path / "s" / "records.jsonl").read_text() == first  # from the cache, identical
    assert main(["data", "selfconsistency", "--in", str(tmp_path / "s" / "records.jsonl"), "--output", str(tmp_path / "c")]) == 0
    assert main(["data", "persona", "--skill", "math", "--n", "5", "--output", str(tmp_path / "pe")] + base) == 0
    report = json.loads((tmp_path / "pe" / "report.json").read_text())
    assert report["stats"]["requested"] == 5 and report["command"] == "posttrain data persona"
    assert main(["data", "self-instruct", "--seed-tasks", str(DATA / "self_instruct" / "seed_tasks.jsonl"), "--n", "2",
                 "--batch", "2", "--output", str(tmp_path / "si")] + base) == 0
    assert json.loads((tmp_path / "si" / "report.json").read_text())["stats"]["rounds"] >= 1


def test_bad_inputs_name_the_file_and_record(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "personas.jsonl", [{"persona": "a nurse"}, {"name": "no persona"}])
    assert main(["data", "persona", "--personas", str(bad), "--skill", "math", "--engine", "x", "--output",
                 str(tmp_path / "o")]) == 2
    assert "personas.jsonl: every record needs a non-empty 'persona' string" in capsys.readouterr().err
    sols = write_jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "user", "content": "q"}], "verifier": "gsm8k"}])
    assert main(["data", "selfconsistency", "--in", str(sols), "--output", str(tmp_path / "o")]) == 2
    assert "record 0: field 'solutions' must be a non-empty list" in capsys.readouterr().err
    pool = tmp_path / "pool.yaml"
    pool.write_text("models:\n  - {name: a}\n")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    assert main(["data", "preferences", "--prompts", str(prompts), "--pool", str(pool), "--judge", "x",
                 "--output", str(tmp_path / "o")]) == 2
    assert "pool.yaml: models[0]: fields 'name' and 'engine' are required" in capsys.readouterr().err
    nothing = write_jsonl(tmp_path / "n.jsonl", [{"text": "no prompt here"}])
    assert main(["data", "solve", "--prompts", str(nothing), "--engine", "x", "--output", str(tmp_path / "o")]) == 2
    assert "n.jsonl:1: no prompt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_onpolicy_pairs_take_best_against_worst_by_margin():
    """0/1 verifier: correct vs wrong; IFEval partial credit: the most vs the least compliant reply when
    their scores differ by min_margin; unfinished replies never enter a pair."""
    from posttrain.data.synth.onpolicy import pair_completions

    two = {"instruction_id_list": ["punctuation:no_comma", "startend:quotation"], "kwargs": [{}, {}]}
    records = [{"messages": [{"role": "user", "content": "2+2?"}], "ground_truth": "4", "verifier": "gsm8k"},
               {"messages": [{"role": "user", "content": "hi"}], "ground_truth": two, "verifier": "ifeval"},
               {"messages": [{"role": "user", "content": "1+1?"}], "ground_truth": "2", "verifier": "gsm8k"},
               {"messages": [{"role": "user", "content": "3+3?"}], "ground_truth": "6", "verifier": "gsm8k"}]
    outs = [Completion(text=t, token_ids=[], finish_reason=f, prompt_index=i) for i, t, f in [
        (0, "#### 4", "stop"), (0, "#### 5", "stop"), (0, "#### 4", "length"),
        (1, '"no commas here"', "stop"), (1, "a, b", "stop"), (1, "no commas", "stop"), (1, "a, b, c", "length"),
        (2, "#### 2", "stop"), (2, "#### 2", "stop"), (3, "#### 7", "stop"), (3, "#### 6", "length")]]
    pairs, stats = pair_completions(records, outs, "onpolicy:m", min_margin=1.0)
    assert [(p["prompt"][0]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"], p["scores"])
            for p in pairs] == [("2+2?", "#### 4", "#### 5", [1.0, 0.0]), ("hi", '"no commas here"', "a, b", [1.0, 0.0])]
    assert stats == {"prompts": 4, "pairs": 2, "all_correct": 1, "all_wrong": 1, "too_close": 0}
    pairs, stats = pair_completions(records[1:2], [Completion(text=t, token_ids=[], finish_reason="stop") for t in
                                                   ['"no commas here"', "no commas"]], "onpolicy:m", min_margin=0.5)
    assert [p["scores"] for p in pairs] == [[1.0, 0.5]]
    assert pair_completions(records[1:2], [Completion(text=t, token_ids=[], finish_reason="stop") for t in
                                           ['"no commas here"', "no commas"]], "m")[1]["too_close"] == 1
    with pytest.raises(UserError, match="min_margin"):
        pair_completions(records, outs, "m", min_margin=0)
    # reject_unfinished: a cut-off reply scores 0 and may be the rejected side; it is never chosen ("3+3?":
    # its correct reply was cut off, so all wrong); a text that also finished keeps its finished score
    pairs, stats = pair_completions(records, outs, "onpolicy:m", min_margin=1.0, reject_unfinished=True)
    assert [(p["prompt"][0]["content"], p["chosen"][0]["content"], p["scores"]) for p in pairs] == [
        ("2+2?", "#### 4", [1.0, 0.0]), ("hi", '"no commas here"', [1.0, 0.0])]
    assert stats == {"prompts": 4, "pairs": 2, "all_correct": 1, "all_wrong": 1, "too_close": 0}
    assert {p["rejected"][0]["content"] for p in pairs} <= {"#### 5", "a, b", "a, b, c"}
    cut = [Completion(text=t, token_ids=[], finish_reason=f, prompt_index=0) for t, f in [("#### 4", "stop"), ("4 4 4 4", "length")]]
    assert pair_completions(records[:1], cut, "m", reject_unfinished=True)[0][0]["rejected"][0]["content"] == "4 4 4 4"
    assert pair_completions(records[:1], cut, "m")[1]["all_correct"] == 1
