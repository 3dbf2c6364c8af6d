"""The ``posttrain`` command: parse arguments, load the config, call the stage. Nothing else."""

from __future__ import annotations

import argparse
import os
import sys

from posttrain.argtypes import natural_float, port, positive_float, positive_int
from posttrain.errors import UserError
from posttrain.stages import STAGES

USAGE_OVERRIDES = "config overrides as key=value (dotted keys reach into lists and mappings: datasets.0.count=100)"
def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _close_process_group() -> None:
    """Destroy the process group a command made (accelerate, torchrun, FSDP) before the interpreter ends:
    gloo threads still alive at interpreter teardown abort the process ("terminate called without an
    active exception", exit -6) now and then after a finished run. Only after success, as torchtitan
    does: a rank that failed mid-collective would wait here for the others."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_stage(args) -> None:
    from posttrain.config_io import load_config

    stage = STAGES[args.command]
    stage.run(load_config(stage.config, args.config, args.overrides))


def _int_list(text: str, flag: str, low: int = 0) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if any(v < low for v in values):
        raise UserError(f"{flag}: every value must be >= {low}, got {text!r}")
    return values


def _data_map(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise UserError(f"--data {item!r}: expected TASK=PATH")
        out[task] = path
    return out


def cmd_eval(args) -> None:
    from posttrain.eval.runner import evaluate, evaluate_checkpoints

    names = ([f"suite:{args.suite}"] if args.suite else []) + [t for t in (args.tasks or "").split(",") if t]
    if not names:
        raise UserError("give --tasks or --suite")
    if bool(args.model) == bool(args.checkpoints):
        raise UserError("give exactly one of --model DIR and --checkpoints RUN_DIR")
    kwargs = dict(limit=args.limit, data=_data_map(args.data), batch_size=args.batch_size, seed=args.seed, samples=args.samples,
                  judge=args.judge, max_new_tokens=args.max_new_tokens, engine=args.engine, chat_template=args.chat_template)
    if args.env:
        kwargs.update(env=args.env, env_args=_env_args(args.env_arg), max_turns=args.max_turns,
                      max_episode_tokens=args.max_episode_tokens)
    elif args.env_arg:
        raise UserError("--env-arg needs --env")
    if args.checkpoints:
        evaluate_checkpoints(args.checkpoints, names, args.output, **kwargs)
    else:
        evaluate(args.model, names, args.output, **kwargs)
    print(f"{args.output}/results.json")


def _env_args(pairs: list[str] | None) -> dict:
    """``KEY=VALUE`` options of an environment, each value read as YAML (``timeout=5`` is a number)."""
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--env-arg {pair!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def cmd_compare(args) -> None:
    from posttrain.eval.compare import compare, table

    print(table(compare(args.before, args.after)), end="")


def cmd_tts(args) -> None:
    from posttrain.eval.tts import sweep
    from posttrain.inference.budget_forcing import BudgetForcing

    data = _data_map(args.data)
    unescape = lambda text: text.replace("\\n", "\n")  # noqa: E731  (a "\\n" typed on a command line)
    bf = BudgetForcing(think_start=unescape(args.think_start), think_end=unescape(args.think_end),
                       answer_prefix=unescape(args.answer_prefix),
                       wait=args.wait_string, max_answer_tokens=args.max_answer_tokens)
    sweep(args.model, args.task, args.output, _int_list(args.max_thinking, "--max-thinking"), _int_list(args.wait, "--wait"),
          _int_list(args.majority, "--majority", low=1) or [1], bf, limit=args.limit, data=data.get(args.task),
          temperature=args.temperature, batch_size=args.batch_size, seed=args.seed, max_new_tokens=args.max_new_tokens,
          engine=args.engine)
    print(f"{args.output}/results.json")


def cmd_serve(args) -> None:
    from posttrain.inference.api import KEY_ENV, Limits
    from posttrain.inference.serve import parse_models, serve
    from posttrain.inference.serve_http import Access, Timeouts, is_loopback

    models = parse_models(args.model, args.run)
    if args.name:
        if len(models) != 1:
            raise UserError("--name renames a single --model; name several with --model NAME=DIR")
        models = {args.name: next(iter(models.values()))}
    origins = tuple(o.strip().rstrip("/") for o in args.allowed_origins.split(",") if o.strip())
    access = Access(api_key=args.api_key or os.environ.get(KEY_ENV) or None, allowed_origins=origins,
                    accept_weights=args.accept_weights, loopback=is_loopback(args.host))
    limits = Limits(max_body_bytes=args.limit_body_mb * 2**20, max_weights_bytes=args.limit_weights_mb * 2**20,
                    max_json_depth=args.limit_json_depth, max_tokens=args.limit_max_tokens, max_n=args.limit_n,
                    max_prompts=args.limit_prompts)
    timeouts = Timeouts(request=args.timeout_request, write=args.timeout_write, keep_alive=args.timeout_keep_alive)
    serve(models, args.host, args.port, args.batch_size, args.engine, access, limits, timeouts, args.limit_concurrency)


def cmd_run(args) -> None:
    from posttrain.pipeline import run

    run(args.recipe, args.overrides)


def cmd_soup(args) -> None:
    from posttrain.train.soup import soup

    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    print(soup(args.checkpoints, args.output, weights))


def cmd_demo(args) -> None:
    if args.overrides[:1] == ["selfrag"]:
        from posttrain.demo_selfrag import run_selfrag_demo

        if args.overrides[1:]:
            raise UserError(f"demo selfrag takes no overrides, got {' '.join(args.overrides[1:])}")
        run_selfrag_demo(args.output or "runs/demo-selfrag", args.facts, args.seed or 0)
        return
    if args.facts or args.seed is not None:
        raise UserError("--facts and --seed are options of `posttrain demo selfrag`")
    if args.overrides and args.overrides[0] == "tools":
        from posttrain.demo_tools import run_tools_demo

        run_tools_demo(args.output or "runs/demo-tools", args.overrides[1:])
        return
    from posttrain.demo import run_demo

    run_demo(args.output or "runs/demo", args.overrides)


def cmd_model_tiny(args) -> None:
    from pathlib import Path

    from posttrain.models import build_tiny

    texts = []
    for path in args.text or []:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{path}: file not found")
        try:
            texts.extend(p.read_text(encoding="utf-8").splitlines())
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
    if not texts:
        from posttrain.data.synth.arithmetic import addition_problems, addition_record

        texts = [str(addition_record(a, b)) for a, b in addition_problems(100, digits=1)]
    build_tiny(args.output, texts, vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.layers,
               num_heads=args.heads, num_kv_heads=args.kv_heads, seed=args.seed)
    print(args.output)


def cmd_model_prepare(args) -> None:
    from posttrain.models import resolve

    print(resolve(args.name))


def parser() -> argparse.ArgumentParser:
    from posttrain.data.commands import add_parsers as add_data_parsers
    from posttrain.rag.commands import add_data_parsers as add_rag_data_parsers
    from posttrain.rag.commands import add_parser as add_rag_parser

    p = argparse.ArgumentParser(prog="posttrain",
                                description="Post-train language models: the Tulu 3 recipe, open and reproducible.")
    sub = p.add_subparsers(dest="command", required=True)

    for stage in STAGES.values():
        if not stage.trains:  # recipe-only stages: posttrain eval and posttrain tts are their commands
            continue
        s = sub.add_parser(stage.name, help=stage.help, description=f"{stage.help}. Keys and defaults: "
                                                                   f"docs/{stage.docs}.md.")
        s.add_argument("--config", help="YAML file of config keys (optional: key=value overrides alone work too)")
        s.add_argument("overrides", nargs="*", help=USAGE_OVERRIDES)
        s.set_defaults(func=cmd_stage)

    e = sub.add_parser("eval", help="evaluate a model or every checkpoint of a run on tasks or suites")
    e.add_argument("--model", help="model directory (or hub id, .gguf, alias), or openai:<model>@<base_url>")
    e.add_argument("--checkpoints", help="a run's output_dir: evaluate each checkpoint and the final model, plot a curve")
    e.add_argument("--tasks", help="comma-separated: gsm8k, gsm8k_fewshot, math500, ifeval, humaneval, mc, judge_winrate, "
                   "verifiable (any file of verifiable prompts, with --data verifiable=PATH)")
    e.add_argument("--suite", choices=["dev", "unseen"], help="a named task list (posttrain.eval.tasks.SUITES)")
    e.add_argument("--limit", type=positive_int, help="first N instances of each task")
    e.add_argument("--data", action="append", metavar="TASK=PATH", help="a local file (or hub id) for a task")
    e.add_argument("--samples", type=positive_int, help="completions per instance (pass@k); default: the task's")
    e.add_argument("--judge", help="judge for judge_winrate: openai:<model>@<base_url> (key from OPENAI_API_KEY)")
    e.add_argument("--max-new-tokens", type=positive_int, help="longest completion of every generating task (default: each task's own)")
    e.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                   help="generation engine for a local model (vllm: the optional extra, docs/engines.md)")
    e.add_argument("--batch-size", type=positive_int, default=16)
    e.add_argument("--chat-template", help="render prompts with this template (tulu, chatml, gemma or Jinja) instead of "
                                           "the tokenizer's own: a base model in its successors' format")
    e.add_argument("--env", help="play generating tasks as multi-turn episodes with this environment's tools: python, "
                   "search or openenv:<module>:<Class> (docs/agents.md)")
    e.add_argument("--env-arg", action="append", metavar="KEY=VALUE",
                   help="an option of the environment, e.g. timeout=5 or index=DIR (YAML values)")
    e.add_argument("--max-turns", type=positive_int, default=4, help="with --env: model turns per episode at most")
    e.add_argument("--max-episode-tokens", type=positive_int, default=1024,
                   help="with --env: tokens after the prompt per episode, tool results included")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--output", default="runs/eval", help="output directory (default: runs/eval)")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compare", help="paired comparison of two evaluations of the same instances (before/after)")
    c.add_argument("before", help="output directory of `posttrain eval` (its samples.jsonl)")
    c.add_argument("after", help="output directory of `posttrain eval` on the same data")
    c.set_defaults(func=cmd_compare)

    t = sub.add_parser("tts", help="test-time scaling: budget forcing and majority voting sweeps (s1)")
    t.add_argument("--model", required=True)
    t.add_argument("--task", required=True)
    t.add_argument("--max-thinking", default="", help="comma-separated thinking-token caps, e.g. 64,128,256 "
                   "(with neither this nor --wait: plain sampling, majority voting only)")
    t.add_argument("--wait", default="", help="comma-separated numbers of 'Wait' extensions, e.g. 0,1,2")
    t.add_argument("--majority", default="1", help="comma-separated majority-vote sizes, e.g. 1,4,8")
    t.add_argument("--limit", type=positive_int)
    t.add_argument("--data", action="append", metavar="TASK=PATH")
    t.add_argument("--temperature", type=natural_float, default=0.8, help="sampling temperature when majority > 1")
    t.add_argument("--think-start", default="<think>")
    t.add_argument("--think-end", default="</think>")
    t.add_argument("--answer-prefix", default="\nFinal Answer:")
    t.add_argument("--wait-string", default="Wait")
    t.add_argument("--max-answer-tokens", type=positive_int, default=64)
    t.add_argument("--max-new-tokens", type=positive_int, default=256,
                   help="longest completion without --max-thinking/--wait (plain sampling), or longest uncapped thinking")
    t.add_argument("--batch-size", type=positive_int, default=16)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--engine", choices=["transformers", "vllm"], default="transformers", help="generation engine")
    t.add_argument("--output", default="runs/tts")
    t.set_defaults(func=cmd_tts)

    v = sub.add_parser("serve", help="serve local models behind an OpenAI-compatible API (/v1/chat/completions)")
    v.add_argument("--model", action="append", default=[],
                   help="a model directory or alias, or NAME=DIR; repeat for several (a request names one in 'model')")
    v.add_argument("--run", help="serve every stage's model of a posttrain run / demo output directory (and its base)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=port, default=8000)
    v.add_argument("--name", help="the model name clients ask for (default: the --model value)")
    v.add_argument("--batch-size", type=positive_int, default=8)
    v.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                   help="generation engine; vllm also serves the rollout routes RLVR's vllm_servers use (docs/engines.md)")
    v.add_argument("--api-key", help="the Bearer token every route but the chat page needs (default: $POSTTRAIN_API_KEY; "
                   "required for --accept-weights and for a --host other than loopback)")
    v.add_argument("--allowed-origins", default="",
                   help="comma-separated web origins (e.g. https://app.example) whose pages may call this server; "
                        "'*' for any (requests from other origins are refused)")
    v.add_argument("--accept-weights", action="store_true",
                   help="let key holders replace the weights (POST /posttrain/weights: RLVR's weight push)")
    v.add_argument("--limit-max-tokens", type=positive_int, default=4096, help="most max_tokens a request may ask for")
    v.add_argument("--limit-n", type=positive_int, default=16, help="most completions per request (n)")
    v.add_argument("--limit-body-mb", type=positive_int, default=8, help="largest JSON request body, MiB")
    v.add_argument("--limit-weights-mb", type=positive_int, default=16384, help="largest weights upload, MiB")
    v.add_argument("--limit-json-depth", type=positive_int, default=32, help="deepest nesting of a JSON body")
    v.add_argument("--limit-prompts", type=positive_int, default=1024, help="most prompts per /posttrain/complete")
    v.add_argument("--limit-concurrency", type=positive_int, default=512,
                   help="most connections at once (503 past it)")
    v.add_argument("--timeout-request", type=positive_float, default=30.0,
                   help="seconds for a request's headers, and again for its JSON body (408 past them)")
    v.add_argument("--timeout-write", type=positive_float, default=60.0,
                   help="seconds a streaming client may stop reading before its connection is closed")
    v.add_argument("--timeout-keep-alive", type=positive_int, default=5, help="seconds an idle connection is kept")
    v.set_defaults(func=cmd_serve)

    r = sub.add_parser("run", help="run every stage of a recipe in order (skips finished stages, resumes interrupted ones)")
    r.add_argument("recipe", help="YAML recipe with output_dir and stages")
    r.add_argument("overrides", nargs="*", help="STAGE.key=value overrides of one stage's config")
    r.set_defaults(func=cmd_run)

    so = sub.add_parser("soup", help="average the weights of several checkpoints")
    so.add_argument("checkpoints", nargs="+")
    so.add_argument("--output", required=True, help="directory of the averaged model")
    so.add_argument("--weights", help="comma-separated weights, one per checkpoint (default: equal)")
    so.set_defaults(func=cmd_soup)

    da = sub.add_parser("data", help="data tools: synthesis, decontamination, filtering, preference pairs, selection")
    dsub = da.add_subparsers(dest="data_command", required=True)
    add_data_parsers(dsub)
    add_rag_data_parsers(dsub)

    add_rag_parser(sub)

    d = sub.add_parser("demo", help="the main job on its embedded default: the whole recipe (midtrain, anneal, SFT, "
                       "on-policy DPO, GRPO, evaluations, majority voting) on a tiny model, on CPU; "
                       "`posttrain demo selfrag`: Self-RAG on a tiny model about facts it never trained on; "
                       "`posttrain demo tools`: a tiny model learns to call a sandboxed python tool (docs/agents.md)")
    d.add_argument("--output", help="output directory (default: runs/demo, runs/demo-selfrag or runs/demo-tools)")
    d.add_argument("--facts", help="demo selfrag: your own facts, JSONL of {subject, relation, object, text}")
    d.add_argument("--seed", type=int, help="demo selfrag: the seed of the generated facts, split and training")
    d.add_argument("overrides", nargs="*", help="STAGE.key=value overrides of posttrain/recipes/demo.yaml, or `selfrag`, "
                   "or `tools` and overrides of posttrain/recipes/demo_tools.yaml")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("model", help="build or prepare models")
    msub = m.add_subparsers(dest="model_command", required=True)
    t = msub.add_parser("tiny", help="a few-layer Llama with a BPE tokenizer trained on the fly (tests, demos)")
    t.add_argument("--output", required=True)
    t.add_argument("--text", action="append", help="text file(s) to train the tokenizer on, one example per line")
    t.add_argument("--vocab-size", type=positive_int, default=512)
    t.add_argument("--hidden-size", type=positive_int, default=64)
    t.add_argument("--layers", type=positive_int, default=2)
    t.add_argument("--heads", type=positive_int, default=4)
    t.add_argument("--kv-heads", type=positive_int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_model_tiny)
    pr = msub.add_parser("prepare", help="resolve a model (alias, GGUF, hub id), converting and caching it; prints its path")
    pr.add_argument("name")
    pr.set_defaults(func=cmd_model_prepare)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # `demo tools --output DIR key=value`: the demo's options may come between its words
        words, options, rest = [], [], iter(argv[1:])
        for item in rest:
            if item.startswith("--") and "=" not in item and item not in ("--help", "-h"):
                options += [item, next(rest, "")]
            else:
                (options if item in ("--help", "-h") or item.startswith("--") else words).append(item)
        argv = ["demo", *options, *words]
    args = parser().parse_args(argv)
    try:
        _quiet_libraries()
        args.func(args)
        _close_process_group()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that is missing or not writable, a port in use: one line, not a traceback
        print(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
