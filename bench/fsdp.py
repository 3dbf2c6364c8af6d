"""Sharded against replicated training: SmolLM2-135M-Instruct SFT on 2 processes, FSDP and ZeRO vs DDP.

    python bench/fsdp.py                              # SmolLM2-135M-Instruct, 2 processes
    python bench/fsdp.py --tcmalloc                   # the same with tcmalloc (peak memory that reflects sharding)
    python bench/fsdp.py --model tiny --steps 6       # a quick check of the script

Each layout runs ``torchrun --nproc_per_node 2 -m posttrain.cli sft`` on the same data, lengths and
global batch (GSM8K solutions packed to --max-length tokens, --batch-size rows per process, fp32, one
thread per process: 2 processes on 2 cores), one layout after the other in this one run, and a single
process with the same global batch as the baseline; DeepSpeed ZeRO-2/3 rows need ``pip install
deepspeed``. Reported per layout: trained input tokens per
second over the steps after the first (warm-up), the peak resident memory of each process, and the
bytes of parameters, gradients and AdamW state each process holds (posttrain.train.parallel).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import DATA, rate, tiny_model

GSM8K = DATA / "gsm8k" / "train.jsonl"
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def conversations(n: int) -> list[dict]:
    from posttrain.data.adapters import gsm8k_solution

    out = []
    with open(GSM8K) as f:
        for line, _ in zip(f, range(n)):
            r = json.loads(line)
            out.append({"messages": [{"role": "user", "content": r["question"]},
                                     {"role": "assistant", "content": gsm8k_solution(r["answer"])}]})
    return out


# name -> (processes, config overrides)
LAYOUTS = {"one-process": (1, ["parallel=ddp"]), "ddp": (2, ["parallel=ddp"]), "fsdp": (2, ["parallel=fsdp"]),
           "fsdp-no-reshard": (2, ["parallel=fsdp", "fsdp_reshard_after_forward=false"]),
           "zero2": (2, ["parallel=deepspeed", "deepspeed_zero_stage=2"]),
           "zero3": (2, ["parallel=deepspeed", "deepspeed_zero_stage=3"])}


def run(layout: str, model: str, data: Path, out: Path, args) -> dict:
    processes, layout_keys = LAYOUTS[layout]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] if processes == 2
                else [sys.executable])
    over = [f"model={model}", f"output_dir={out}", f"datasets.0.path={data}", f"max_seq_length={args.max_length}",
            f"per_device_train_batch_size={args.batch_size * 2 // processes}", f"max_steps={args.steps}", *layout_keys]
    cfg = out.parent / "bench.yaml"
    cfg.write_text("datasets:\n  - path: x\npacking: true\nlearning_rate: 2.0e-5\nsave_steps: 0\nlogging_steps: 1\n"
                   "overwrite_output_dir: true\ndecontaminate_against: []\nchat_template: tulu\n")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads // processes)}
    if args.tcmalloc:
        env["LD_PRELOAD"] = args.tcmalloc
    print(f"{layout}: running {args.steps} steps", file=sys.stderr, flush=True)
    subprocess.run(launcher + ["-m", "posttrain.cli", "sft", "--config", str(cfg), *over], check=True, env=env)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    return {"layout": layout, "processes": processes,
            "tokens_per_second": rate([(x["elapsed_seconds"], x["num_input_tokens_seen"]) for x in lines]),
            "peak_rss_mb": metrics["peak_rss_mb_per_process"],
            "state_mb": (metrics["params_bytes"] + metrics["grads_bytes"] + metrics["optimizer_bytes"]) / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a model name, or 'tiny'")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2, help="rows per process per step (2 processes)")
    p.add_argument("--threads", type=int, default=2, help="threads in all (split between the processes)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"some of {', '.join(LAYOUTS)}")
    p.add_argument("--tcmalloc", nargs="?", const=TCMALLOC, default=None,
                   help=f"run the trainers with tcmalloc (LD_PRELOAD; default path {TCMALLOC}): glibc's malloc keeps "
                        "the freed all-gather and reduce-scatter buffers, which hides what sharding saves")
    args = p.parse_args()
    if args.tcmalloc and not Path(args.tcmalloc).is_file():
        p.error(f"--tcmalloc: {args.tcmalloc} not found (Debian: apt-get install libtcmalloc-minimal4)")
    layouts = args.layouts.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        records = conversations(2000)
        data = work / "gsm8k.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        model = args.model
        if model == "tiny":
            model = tiny_model(work / "tiny", [m["content"] for r in records for m in r["messages"]])
        rows = [run(layout, model, data, work / layout, args) for layout in layouts]

    base = next((r for r in rows if r["layout"] == "ddp"), rows[0])
    print(f"\nSFT of {args.model}: {args.batch_size * 2} rows of {args.max_length} tokens per step, {args.steps} steps, "
          f"{args.threads} threads in all, allocator {'tcmalloc' if args.tcmalloc else 'glibc malloc'}\n")
    print("| layout | processes | tokens/s | vs ddp | peak RSS per process (MB) | params+grads+AdamW per process (MB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rss = " / ".join(f"{v:,.0f}" for v in r["peak_rss_mb"])
        print(f"| {r['layout']} | {r['processes']} | {r['tokens_per_second']:.1f} | "
              f"{r['tokens_per_second'] / base['tokens_per_second']:.2f}x | {rss} | {r['state_mb']:,.0f} |")


if __name__ == "__main__":
    main()
