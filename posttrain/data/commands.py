"""``posttrain data ...``: the data tools' command-line parsers and what each command writes.

Every command that calls a model takes ``--engine``-style arguments: a local model (directory, hub id
or alias) or ``openai:<model>@<base_url>``. Answers are cached under ``--cache`` (default
``OUTPUT/.cache``) as they arrive, so re-running an interrupted command continues where it stopped.
Each command writes its records (JSONL) and ``report.json`` (arguments and counts) under ``--output``,
atomically, at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.argtypes import finite_float, fraction, natural_float, natural_int, positive_int
from posttrain.errors import UserError

EXAMPLE_PERSONAS = Path(__file__).parent / "examples" / "personas.jsonl"


def _engine(spec: str, args, cache_name: str = "engine"):
    from posttrain.inference.open import open_engine

    cache = Path(args.cache) if args.cache else Path(args.output) / ".cache"
    engine = open_engine(spec, cache / cache_name, batch_size=args.batch_size, max_retries=args.retries)
    engine.progress = f"data {args.data_command} ({cache_name})"
    return engine


def _license_of(spec: str) -> str:
    """A generator's license: an endpoint's is its provider's terms; a local model's from
    posttrain.models.license_of (alias, manifest lineage or model card)."""
    from posttrain.models import license_of

    return "see the provider's terms" if spec.startswith("openai:") else license_of(spec)


def _write(args, files: dict[str, list[dict]], report: dict) -> None:
    """Each records file (JSONL) and ``report.json`` (the command, its arguments, ``report``)."""
    from posttrain.atomic import write_json, write_text

    out = Path(args.output)
    for name, records in files.items():
        write_text(out / name, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))
        print(f"{len(records)} records -> {out / name}")
    params = {k: v for k, v in vars(args).items() if k not in ("func", "command", "data_command")}
    write_json(out / "report.json", {"command": f"posttrain data {args.data_command}", "arguments": params, **report})


def _read_jsonl(path: str) -> list[dict]:
    from posttrain.data.io import read_records

    return [raw for raw, _ in read_records(path)]


def cmd_arithmetic(args) -> None:
    from posttrain.atomic import write_json, write_text
    from posttrain.data.synth import arithmetic as ar

    out = Path(args.output)
    files: dict[str, list[str]] = {"corpus.txt": [], "sft.jsonl": [], "rlvr.jsonl": [], "heldout.jsonl": []}
    counts = {}
    for op in [o.strip() for o in args.ops.split(",") if o.strip()]:
        if op not in ar.SYMBOLS:
            raise UserError(f"--ops: unknown operation {op!r}; expected some of {', '.join(ar.SYMBOLS)}")
        train, heldout = ar.split_problems(ar.problems(op, args.train + args.heldout, args.digits, args.seed), args.heldout)
        ar.check_disjoint([ar.question(op, a, b) for a, b in train], [ar.question(op, a, b) for a, b in heldout])
        files["corpus.txt"] += [ar.corpus_line(op, a, b) for a, b in train]
        files["sft.jsonl"] += [json.dumps(ar.sft_record(op, a, b)) for a, b in train]
        files["rlvr.jsonl"] += [json.dumps(ar.rlvr_record(op, a, b)) for a, b in train]
        files["heldout.jsonl"] += [json.dumps(ar.rlvr_record(op, a, b)) for a, b in heldout]
        counts[op] = {"train": len(train), "heldout": len(heldout)}
    for name, lines in files.items():
        write_text(out / name, "".join(line + "\n" for line in lines))
    write_json(out / "manifest.json", {"generator": "posttrain data arithmetic", "ops": counts, "digits": args.digits,
                                       "seed": args.seed, "license": ar.LICENSE, "files": sorted(files)})
    print(out)


def cmd_constraints(args) -> None:
    from collections import Counter

    from posttrain.data.decontam import NgramIndex, check_texts
    from posttrain.eval.instances import eval_instances
    from posttrain.data.synth.constraints import build, read_requests

    requests, dropped = read_requests(args.requests)
    index = NgramIndex(args.ngram)
    for inst in eval_instances([a.strip() for item in args.against for a in item.split(",") if a.strip()]):
        index.add(inst)
    matches = check_texts(index, [r["text"] for r in requests], args.threshold)
    flagged = [{"request": r["text"][:300], "where": r["where"], "matched_task": m.task, "matched_id": m.id,
                "overlap": m.overlap} for r, m in zip(requests, matches) if m is not None]
    clean = [r for r, m in zip(requests, matches) if m is None]
    if not clean:
        raise UserError("every request overlaps the evaluation sets; nothing to build from")
    records = build(clean, args.n, args.seed, args.min_constraints, args.max_constraints)
    ids = Counter(i for r in records for i in r["ground_truth"]["instruction_id_list"])
    stats = {"requests": dict(Counter(r["kind"] for r in requests)), "dropped": dict(dropped),
             "decontamination": {"against": args.against, "ngram": args.ngram, "threshold": args.threshold,
                                 "checked": len(requests), "flagged": len(flagged), "examples": flagged[:20]},
             "records": len(records), "distinct_requests": len({r["messages"][0]["content"] for r in records}),
             "by_kind": dict(Counter(r["source"].split("/", 1)[1] for r in records)),
             "constraints_per_prompt": dict(sorted(Counter(len(r["ground_truth"]["instruction_id_list"])
                                                           for r in records).items())),
             "instructions": dict(sorted(ids.items()))}
    print(f"{len(requests)} requests, {len(flagged)} flagged against {', '.join(args.against)}")
    _write(args, {"records.jsonl": records}, {"stats": stats})


def cmd_conform(args) -> None:
    from posttrain.data.io import read_records
    from posttrain.data.synth.conform import build, read_references
    from posttrain.data.synth.prompts import prompt_record

    prompts = []
    for path in args.prompts:
        for raw, where in read_records(path):
            rec = prompt_record(raw, where)
            if rec["verifier"] != "ifeval" or not isinstance(rec["ground_truth"], dict):
                raise UserError(f"{where}: field 'verifier' must be 'ifeval' with IFEval's ground truth")
            if not isinstance(raw.get("request_source"), str):
                raise UserError(f"{where}: field 'request_source' is missing (prompts of `posttrain data constraints` "
                                "name their request's record)")
            prompts.append({**rec, "request_source": raw["request_source"], "where": where})
            prompts[-1].setdefault("source", path)
    records, report = build(prompts, read_references(prompts), args.seed)
    print(f"{report['records']} of {report['prompts']} prompts kept (every constraint verified)")
    _write(args, {"records.jsonl": records}, {"stats": report})


def cmd_program_aided(args) -> None:
    import random

    from posttrain.data.adapters import GSM8K_INSTRUCTION, gsm8k_final_answer
    from posttrain.data.io import read_records
    from posttrain.data.synth import program_aided as pa
    from posttrain.envs.python import PythonEnv

    env = PythonEnv()
    problems, dropped = [], {}
    for i, (raw, where) in enumerate(read_records(args.input)):
        if args.limit is not None and i >= args.limit:
            break
        for field in ("question", "answer"):
            if not isinstance(raw.get(field), str) or not raw[field].strip():
                raise UserError(f"{where}: field '{field}' must be a non-empty string (GSM8K's format)")
        try:
            record = pa.trajectory(raw["question"], raw["answer"], GSM8K_INSTRUCTION, env.system_prompt, env.tools)
        except pa.Unchecked as e:
            reason = str(e).split(" ", 2)[0] if str(e).startswith("step") else str(e).split(" is ")[0]
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        record.update(source=where, license=args.license)
        prompt = {"messages": [{"role": "user", "content": raw["question"] + GSM8K_INSTRUCTION}],
                  "ground_truth": gsm8k_final_answer(raw["answer"]), "verifier": "gsm8k", "source": where,
                  "license": args.license, "steps": len(pa.steps(raw["answer"]))}
        problems.append((record, prompt))
    if len(problems) < args.sft + args.rlvr:
        raise UserError(f"{args.input}: {len(problems)} solutions check, asked for --sft {args.sft} + --rlvr {args.rlvr}")
    random.Random(args.seed).shuffle(problems)
    sft = [r for r, _ in problems[:args.sft]]
    rlvr = [p for _, p in problems[args.sft:] if p["steps"] <= args.rlvr_max_steps][:args.rlvr]
    if len(rlvr) < args.rlvr:
        raise UserError(f"{args.input}: {len(rlvr)} problems left with at most {args.rlvr_max_steps} steps, "
                        f"asked for --rlvr {args.rlvr}")
    print(f"{len(problems)} solutions checked, {sum(dropped.values())} dropped ({dropped})")
    _write(args, {"sft.jsonl": sft, "rlvr.jsonl": rlvr},
           {"checked": len(problems), "dropped": dropped, "sft": len(sft), "rlvr": len(rlvr)})


def cmd_decontaminate(args) -> None:
    from posttrain.data.decontam import decontaminate
    from posttrain.eval.instances import eval_instances

    against = [a.strip() for item in args.against for a in item.split(",") if a.strip()]
    report = decontaminate(args.train, against, eval_instances(against), args.output, n=args.ngram, threshold=args.threshold, mode=args.mode,
                           remove=args.remove, workers=args.workers, min_words=args.min_words)
    s = report["summary"]
    for name, src in s["sources"].items():
        print(f"{name}: {src['flagged']} / {src['records']} flagged ({src['percent']}%)")
    print(f"report: {Path(args.output) / 'report.json'}")


def cmd_persona(args) -> None:
    from posttrain.data.synth.persona import synthesize

    personas = []
    for raw in _read_jsonl(args.personas):
        text = raw.get("persona") if isinstance(raw, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{args.personas}: every record needs a non-empty 'persona' string")
        personas.append(text.strip())
    records, stats = synthesize(personas, args.skill, _engine(args.engine, args), args.n, args.engine,
                                args.generator_license or _license_of(args.engine), seed=args.seed,
                                temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    _write(args, {"records.jsonl": records}, {"stats": stats})


def cmd_solve(args) -> None:
    from posttrain.data.synth.prompts import read_prompts
    from posttrain.data.synth.selfconsistency import solve

    prompts = read_prompts(args.prompts, args.verifier)
    solved = solve(_engine(args.engine, args), prompts, args.samples, args.temperature, args.max_new_tokens, args.seed)
    answered = sum(s["answer"] is not None for r in solved for s in r["solutions"])
    _write(args, {"records.jsonl": solved}, {"stats": {"prompts": len(solved), "solutions": len(solved) * args.samples,
                                                     "with_answer": answered}})


def cmd_rejection(args) -> None:
    from posttrain.data.synth.prompts import read_prompts
    from posttrain.data.synth.rejection import rejection_sample

    records, stats = rejection_sample(_engine(args.engine, args), read_prompts(args.prompts), args.samples,
                                      args.temperature, args.max_new_tokens, args.seed, args.min_score, args.per_prompt)
    for r in records:
        r["generator"], r["generator_license"] = args.engine, args.generator_license or _license_of(args.engine)
    _write(args, {"records.jsonl": records}, {"stats": stats})


def cmd_selfconsistency(args) -> None:
    from posttrain.data.synth.selfconsistency import vote

    sft, rlvr, stats = vote(_read_jsonl(args.input), args.min_agreement)
    _write(args, {"records.jsonl": sft, "rlvr.jsonl": rlvr}, {"stats": stats})


def cmd_preferences(args) -> None:
    from posttrain.data.synth.preferences import build_pairs, load_pool
    from posttrain.data.synth.prompts import read_prompts

    specs, per_prompt = load_pool(args.pool)
    pool = {name: _engine(spec, args, f"pool-{name}") for name, spec in specs.items()}
    onpolicy = ("onpolicy", _engine(args.onpolicy, args, "onpolicy")) if args.onpolicy else None
    pairs, judged, stats = build_pairs(read_prompts(args.prompts), pool, _engine(args.judge, args, "judge"), onpolicy,
                                       per_prompt, args.max_new_tokens, args.temperature, seed=args.seed)
    _write(args, {"records.jsonl": pairs, "judgments.jsonl": judged}, {"stats": stats})


def cmd_select(args) -> None:
    from posttrain.data.synth.select import DEFAULT_DOMAINS, select

    specs = [s.strip() for s in (args.difficulty_models or "").split(",") if s.strip()]
    difficulty = {spec: _engine(spec, args, f"difficulty-{i}") for i, spec in enumerate(specs)}
    domains = tuple(d.strip() for d in args.domain_list.split(",")) if args.domain_list else DEFAULT_DOMAINS
    chosen, report = select(_read_jsonl(args.input), args.size, difficulty, args.domain_field,
                            _engine(args.domain_engine, args, "domains") if args.domain_engine else None, domains,
                            args.seed, args.max_new_tokens)
    _write(args, {"records.jsonl": chosen}, {"stats": report})


def cmd_self_instruct(args) -> None:
    from posttrain.data.synth.self_instruct import bootstrap

    seeds = _read_jsonl(args.seed_tasks)
    for i, t in enumerate(seeds):
        if not isinstance(t.get("instruction"), str):
            raise UserError(f"{args.seed_tasks}: record {i + 1}: field 'instruction' (a string) is required")
    records, stats = bootstrap(seeds, _engine(args.engine, args), args.n, args.engine, batch=args.requests_per_round,
                               temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    _write(args, {"records.jsonl": records}, {"stats": stats})


def _common(p, engine: bool = True, sampling: bool = True) -> None:
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    if engine:
        p.add_argument("--cache", help="cache directory for model answers (default: OUTPUT/.cache)")
        p.add_argument("--batch-size", type=positive_int, default=16, help="batch size of a local model")
        p.add_argument("--retries", type=natural_int, default=6, help="retries of a failed endpoint request (backoff doubles)")
        p.add_argument("--max-new-tokens", type=positive_int, default=512)
    if engine and sampling:
        p.add_argument("--temperature", type=natural_float, default=0.7)


def add_parsers(dsub) -> None:
    ar = dsub.add_parser("arithmetic", help="synthetic verifiable math: corpus, SFT, RLVR and disjoint held-out sets")
    ar.add_argument("--output", required=True)
    ar.add_argument("--ops", default="add,sub,mul", help="comma-separated: add, sub, mul")
    ar.add_argument("--digits", type=positive_int, default=2, help="digits per operand at most (difficulty)")
    ar.add_argument("--train", type=natural_int, default=1000, help="training problems per operation")
    ar.add_argument("--heldout", type=natural_int, default=200, help="held-out problems per operation")
    ar.add_argument("--seed", type=int, default=0)
    ar.set_defaults(func=cmd_arithmetic)

    dc = dsub.add_parser("decontaminate", help="flag (and remove) training prompts that overlap evaluation sets")
    dc.add_argument("--train", nargs="+", required=True, help="data files / hub ids, or a YAML mix with 'datasets:'")
    dc.add_argument("--against", action="append", required=True,
                    help="comma-separated suites (suite:dev), tasks (gsm8k) and task files (gsm8k=PATH); repeatable")
    dc.add_argument("--output", required=True)
    dc.add_argument("--ngram", type=positive_int, default=8, help="words per n-gram")
    dc.add_argument("--threshold", type=fraction, default=0.5,
                    help="flag when this share of an evaluation instance's n-grams occurs in the prompt")
    dc.add_argument("--mode", choices=["ngram", "exact"], default="ngram",
                    help="exact: flag only prompts containing a whole normalised evaluation text")
    dc.add_argument("--remove", action="store_true", help="write clean copies under OUTPUT/clean and a manifest")
    dc.add_argument("--workers", type=positive_int, help="processes (default: the CPU count, at most 8)")
    dc.add_argument("--min-words", type=natural_int, default=4,
                    help="evaluation items with fewer words (and fewer than --ngram) are not checked, only counted")
    dc.set_defaults(func=cmd_decontaminate)

    co = dsub.add_parser("constraints", help="verifiable-instruction RLVR prompts: local requests + 1-3 IFEval "
                                             "constraints, decontaminated against evaluation prompts")
    co.add_argument("--requests", nargs="+", required=True,
                    help="files of base requests: self-instruct tasks, hh-rlhf pairs, GSM8K, personas, prompt files")
    co.add_argument("--against", action="append", required=True,
                    help="evaluation sets the requests must not overlap, as for decontaminate (ifeval=PATH); repeatable")
    co.add_argument("--n", type=positive_int, default=2000, help="prompts to write")
    co.add_argument("--min-constraints", type=natural_int, default=1)
    co.add_argument("--max-constraints", type=positive_int, default=3)
    co.add_argument("--ngram", type=positive_int, default=8, help="words per n-gram of the overlap check")
    co.add_argument("--threshold", type=fraction, default=0.5, help="share of an evaluation item's n-grams that flags")
    _common(co, engine=False)
    co.set_defaults(func=cmd_constraints)

    cf = dsub.add_parser("conform", help="constraint-following SFT data without a model: each prompt's reference "
                                         "reply edited to meet its constraints, kept when the ifeval verifier passes")
    cf.add_argument("--prompts", nargs="+", required=True, help="records of `posttrain data constraints`")
    cf.add_argument("--output", required=True, help="output directory")
    cf.add_argument("--seed", type=int, default=0)
    cf.set_defaults(func=cmd_conform)

    pa = dsub.add_parser("program-aided", help="python-tool SFT trajectories from GSM8K solutions (their calculator "
                                               "steps as one checked program) and RLVR prompts for `env: python`")
    pa.add_argument("--input", required=True, help="GSM8K-format JSONL (question, answer with <<expr=result>> steps)")
    pa.add_argument("--limit", type=natural_int, help="read only the first LIMIT records (e.g. 7000: train[:7000])")
    pa.add_argument("--sft", type=natural_int, default=500, help="trajectories to write")
    pa.add_argument("--rlvr", type=natural_int, default=500, help="RLVR prompts to write (other problems)")
    pa.add_argument("--rlvr-max-steps", type=positive_int, default=99,
                    help="RLVR prompts only from solutions of at most this many calculator steps")
    pa.add_argument("--license", default="MIT", help="the input's license, written into every record")
    _common(pa, engine=False)
    pa.set_defaults(func=cmd_program_aided)

    pe = dsub.add_parser("persona", help="persona-driven prompts: math, code, or IFEval-style with verifiable constraints")
    pe.add_argument("--personas", default=str(EXAMPLE_PERSONAS), help="JSONL with a 'persona' field (default: 24 examples)")
    pe.add_argument("--skill", required=True, choices=["math", "code", "ifeval"])
    pe.add_argument("--engine", required=True, help="local model or openai:<model>@<base_url>")
    pe.add_argument("--n", type=positive_int, default=1000)
    pe.add_argument("--generator-license", help="license of the generator's outputs (default: from its model card)")
    _common(pe)
    pe.set_defaults(func=cmd_persona)

    so = dsub.add_parser("solve", help="sample step-by-step solutions, answers extracted by the verifier")
    so.add_argument("--prompts", nargs="+", required=True)
    so.add_argument("--engine", required=True)
    so.add_argument("--samples", type=positive_int, default=4)
    so.add_argument("--verifier", default="gsm8k", choices=["gsm8k", "math"], help="for prompts that do not name one")
    _common(so)
    so.set_defaults(func=cmd_solve)

    rj = dsub.add_parser("rejection", help="verified responses as SFT data: sample, score with each prompt's verifier, "
                                           "keep the finished ones that pass")
    rj.add_argument("--prompts", nargs="+", required=True, help="verifiable prompt files (ground_truth + verifier)")
    rj.add_argument("--engine", required=True)
    rj.add_argument("--samples", type=positive_int, default=4, help="responses drawn per prompt")
    rj.add_argument("--min-score", type=finite_float, default=1.0, help="keep responses the verifier scores at least this")
    rj.add_argument("--per-prompt", type=positive_int, default=1, help="kept responses per prompt at most (best first)")
    rj.add_argument("--generator-license", help="license of the generator's outputs (default: the model's)")
    _common(rj)
    rj.set_defaults(func=cmd_rejection)

    sc = dsub.add_parser("selfconsistency", help="keep prompts whose solutions agree (majority vote)")
    sc.add_argument("--in", dest="input", required=True, help="the output of `posttrain data solve`")
    sc.add_argument("--min-agreement", type=fraction, default=0.5, help="the majority answer's share of the samples")
    _common(sc, engine=False)
    sc.set_defaults(func=cmd_selfconsistency)

    pr = dsub.add_parser("preferences", help="preference pairs from a model pool (+ on-policy) rated by an LLM judge")
    pr.add_argument("--prompts", nargs="+", required=True, help="prompt files (SFT prompts, new, out-of-domain, ...)")
    pr.add_argument("--pool", required=True, help="YAML: models: [{name, engine}], optional per_prompt")
    pr.add_argument("--judge", required=True)
    pr.add_argument("--onpolicy", help="the model being improved (answers every prompt)")
    _common(pr)
    pr.set_defaults(func=cmd_preferences)

    se = dsub.add_parser("select", help="s1 selection: quality, difficulty, diversity down to --size")
    se.add_argument("--in", dest="input", required=True)
    se.add_argument("--size", type=positive_int, required=True)
    se.add_argument("--difficulty-models", help="comma-separated engines; drop questions any of them answers right")
    se.add_argument("--domain-field", help="the field holding each record's domain")
    se.add_argument("--domain-engine", help="an engine that labels domains (when there is no --domain-field)")
    se.add_argument("--domain-list", help="comma-separated domain labels for --domain-engine")
    _common(se, sampling=False)  # reference models and the domain labeller decode greedily
    se.set_defaults(func=cmd_select)

    si = dsub.add_parser("self-instruct", help="bootstrap new instructions from seed tasks")
    si.add_argument("--seed-tasks", required=True, help="JSONL with 'instruction' (self-instruct's seed_tasks.jsonl)")
    si.add_argument("--engine", required=True)
    si.add_argument("--n", type=positive_int, default=500)
    si.add_argument("--requests-per-round", type=positive_int, default=8, help="generation requests per round")
    _common(si)
    si.set_defaults(func=cmd_self_instruct)
