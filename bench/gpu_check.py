"""The ten-minute GPU check: SFT, DPO and GRPO steps of posttrain beside TRL's trainers on real models,
and SFT with FSDP over every visible GPU, in one table (and JSON beside it).

    pip install -e '.[vllm,bench]'
    python bench/gpu_check.py                        # a CUDA machine: SmolLM2-135M-Instruct and Gemma 3 270M, bf16
    python bench/gpu_check.py --device cpu --tiny    # the script's own check on a CPU (CI runs it: under 2 minutes)

Per model and stage, each side (posttrain, TRL) runs in its own process, one after the other, on the
same data, lengths and batch: SFT on GSM8K solutions (packed), DPO on hh-rlhf pairs (sigmoid loss,
reference log-probs precomputed on both sides), GRPO on GSM8K prompts with posttrain's ``gsm8k``
verifier (posttrain's rollouts from vLLM in the same process with its weights pushed every step,
``engine: vllm``, on CUDA unless ``--no-vllm``; TRL generates with ``model.generate``). Reported:
throughput over the steps after the first (SFT and DPO input tokens/s, GRPO completions/s), MFU =
6 x parameters x training tokens/s over the device's peak (bf16 dense tensor-core peak by GPU name,
``--peak-tflops`` to give it; a CPU: a measured fp32 matmul), the process's peak memory (CUDA:
``max_memory_allocated``; CPU: peak RSS), the ratio posttrain / TRL, and the FSDP run's tokens/s
over its processes. ``--tiny`` replaces the models with a 2-layer model built here (fp32 on a CPU).
Any failed run is a row with its error and the exit status is 1. Nothing is downloaded: the models
are the packaged aliases, the data is the repository's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import matmul_flops, quiet, rate

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"smollm2": ("smollm2-135m-instruct", None), "gemma3-270m": ("gemma3-270m", "gemma")}  # name: (alias, template)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0,
                    "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "A6000": 155.0}  # dense, no sparsity
STAGES = ("sft", "dpo", "grpo")


def peak_flops(device: str, given: float | None) -> tuple[float, str]:
    """The device's peak FLOP/s and where the figure comes from."""
    if given:
        return given * 1e12, "given"
    if device == "cpu":
        return matmul_flops(1024, 3, 3), "measured fp32 matmul"
    import torch

    name = torch.cuda.get_device_name(0)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"{name}: bf16 dense peak"
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t), f"{name}: measured bf16 matmul"


def data_files(work: Path) -> dict[str, Path]:
    """The three stages' data: SFT conversations (ours and TRL's forms), DPO pairs, GRPO prompts."""
    from dpo import hh_pairs
    from grpo import prompts_file
    from sft import gsm8k_conversations

    convs = gsm8k_conversations(200)
    files = {"sft-trl": work / "sft-trl.jsonl", "sft": work / "sft.jsonl", "dpo": work / "dpo.jsonl"}
    files["sft-trl"].write_text("".join(json.dumps(c) + "\n" for c in convs))
    files["sft"].write_text("".join(json.dumps({"messages": c["prompt"] + c["completion"]}) + "\n" for c in convs))
    files["dpo"].write_text("".join(json.dumps(x) + "\n" for x in hh_pairs(64, max_chars=600)))
    files["grpo"] = prompts_file(work / "grpo.jsonl", 64)
    return files


def tiny(work: Path, files: dict[str, Path]) -> str:
    from posttrain.models import build_tiny

    texts = [m["content"] for line in files["sft"].read_text().splitlines() for m in json.loads(line)["messages"]]
    build_tiny(work / "tiny", texts, vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, seed=0)
    return str(work / "tiny")


def child(job: dict) -> dict:
    """One run in this process: its throughput, training tokens/s and peak memory."""
    import torch

    import dpo
    import grpo
    import sft

    quiet()
    args = argparse.Namespace(steps=job["steps"], batch_size=job["batch"], max_length=job["max_length"], gc=False,
                              freeze=False, chat_template=job["template"], device=job["device"], dtype=job["dtype"],
                              generations=4, completion_length=job["completion_length"],
                              decontaminate_against=[],  # the contamination report is not what is timed
                              vllm_memory=0.3 if job["device"] == "cuda" else None)  # vLLM beside the trainer
    out, data, model = Path(job["output"]), Path(job["data"]), job["model"]
    runs = {("sft", "posttrain"): lambda: sft.run_posttrain(model, data, out, args),
            ("sft", "trl"): lambda: sft.run_trl(model, data, out, args),
            ("dpo", "posttrain"): lambda: dpo.run_posttrain(model, data, out, args)[0],
            ("dpo", "trl"): lambda: dpo.run_trl(model, data, out, args)[0],
            ("grpo", "posttrain"): lambda: grpo.run_posttrain(model, data, out, args, job["batch"], job["engine"])[0],
            ("grpo", "trl"): lambda: grpo.run_trl(model, data, out, args, job["batch"])}
    if job["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    speed = runs[job["stage"], job["side"]]()
    tokens = speed if job["stage"] == "sft" else None  # SFT's rate is tokens/s on both sides
    if job["side"] == "posttrain" and (out / "metrics.jsonl").is_file():
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        tokens = rate([(r["elapsed_seconds"], r["num_input_tokens_seen"]) for r in rows if "num_input_tokens_seen" in r])
    peak = (torch.cuda.max_memory_allocated() / 2**20 if job["device"] == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"speed": speed, "tokens_per_second": tokens, "peak_mib": peak}


def failure(stderr: str, code: int) -> dict:
    """A failed run's row: its one-line ``error:`` when it printed one, else its last line."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    said = [x for x in lines if x.startswith("error:")] or [x for x in lines if "Error" in x][-1:] or lines[-1:]
    return {"error": (said[0] if said else f"exit {code}")[:300], "stderr": stderr[-4000:]}


def spawn(job: dict, timeout: float) -> dict:
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                              timeout=timeout, cwd=job["output_parent"])
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s"}
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return failure(proc.stderr, proc.returncode)
    return {**json.loads(line[len("RESULT "):]), "seconds": round(time.perf_counter() - started, 1)}


def fsdp(model: str, template: str | None, data: Path, out: Path, job: dict, processes: int, timeout: float) -> dict:
    """SFT with ``parallel: fsdp`` on ``processes`` processes (one per GPU; a CPU: gloo, a thread each)."""
    over = [f"model={model}", f"output_dir={out}", f"datasets=[{{path: {data}}}]", f"max_seq_length={job['max_length']}",
            f"per_device_train_batch_size={job['batch']}", f"max_steps={job['steps']}", "parallel=fsdp",
            f"dtype={job['dtype']}", "packing=true", "save_steps=0", "logging_steps=1", "overwrite_output_dir=true",
            "decontaminate_against=[]", "learning_rate=2e-5"] + ([f"chat_template={template}"] if template else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if job["device"] == "cpu" else dict(os.environ)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "posttrain.cli",
           "sft", *over]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s"}
    if proc.returncode != 0:
        return failure(proc.stderr, proc.returncode)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    peaks = metrics.get("peak_gpu_mb_per_process") or metrics["peak_rss_mb_per_process"]
    tokens = rate([(r["elapsed_seconds"], r["num_input_tokens_seen"]) for r in rows])
    return {"speed": tokens, "tokens_per_second": tokens,
            "peak_mib": max(peaks), "seconds": round(time.perf_counter() - started, 1), "processes": processes}


def table(rows: list[dict], peak: float, source: str) -> str:
    units = {"sft": "tokens/s", "dpo": "pairs/s", "grpo": "completions/s", "sft-fsdp": "tokens/s"}
    lines = [f"peak: {peak / 1e12:.2f} TFLOP/s ({source})", "",
             "| model | stage | side | throughput | training tokens/s | MFU | peak memory (MiB) | posttrain / TRL | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['stage']} | {r['side']} | FAILED: {r['error']} | | | | | |")
            continue
        mfu = f"{6 * r['params'] * r['tokens_per_second'] / peak:.1%}" if r.get("tokens_per_second") else ""
        tokens = f"{r['tokens_per_second']:,.0f}" if r.get("tokens_per_second") else ""
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else ""
        lines.append(f"| {r['model']} | {r['stage']} | {r['side']} | {r['speed']:,.2f} {units[r['stage']]} | {tokens} | "
                     f"{mfu} | {r['peak_mib']:,.0f} | {ratio} | {r['seconds']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model built here instead of the real models")
    p.add_argument("--models", default="smollm2,gemma3-270m", help=f"some of {', '.join(MODELS)}")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: 8; --tiny 3)")
    p.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=None,
                   help="posttrain's GRPO rollouts from vLLM (default: on CUDA)")
    p.add_argument("--trl", action=argparse.BooleanOptionalAction, default=True, help="TRL's trainers beside ours")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=True,
                   help="SFT with FSDP over every visible GPU (a CPU: 2 processes)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak, when its name is not in the table")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds one run may take")
    p.add_argument("--output", default="gpu_check.json", help="the JSON of every row")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible (use --device cpu --tiny for the CPU check)")
    quiet()
    t0 = time.perf_counter()
    cuda = args.device == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    vllm = cuda if args.vllm is None else args.vllm
    steps = args.steps or (3 if args.tiny else 8)
    peak, source = peak_flops(args.device, args.peak_tflops)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        files = data_files(work)
        models = {"tiny": (tiny(work, files), None)} if args.tiny else {n: MODELS[n] for n in args.models.split(",")}
        from posttrain.models import load_model, resolve

        for name, (alias, template) in models.items():
            path = resolve(alias)
            params = sum(t.numel() for t in load_model(path).parameters())
            job = {"model": path, "template": template, "device": args.device, "dtype": dtype, "steps": steps,
                   "batch": 4 if args.tiny else 8, "max_length": 128 if args.tiny else 512,
                   "completion_length": 16 if args.tiny else 128, "engine": "vllm" if vllm else "transformers",
                   "output_parent": str(work)}
            for stage in STAGES:
                got = {}
                for side in ("posttrain", "trl") if args.trl else ("posttrain",):
                    data = files["sft-trl" if (stage, side) == ("sft", "trl") else stage]
                    run = {**job, "stage": stage, "side": side, "data": str(data), "output": str(work / f"{name}-{stage}-{side}")}
                    print(f"{name} {stage} {side}: {steps} steps", file=sys.stderr, flush=True)
                    got[side] = {"model": name, "stage": stage, "side": side, "params": params, **spawn(run, args.timeout)}
                    if "error" in got[side]:
                        print(got[side].get("stderr", got[side]["error"]), file=sys.stderr)
                ours, theirs = got["posttrain"], got.get("trl")
                if theirs and "error" not in ours and "error" not in theirs:
                    ours["ratio"] = ours["speed"] / theirs["speed"]
                rows += list(got.values())
            if args.fsdp:
                processes = torch.cuda.device_count() if cuda else 2
                print(f"{name} sft-fsdp: {processes} processes", file=sys.stderr, flush=True)
                r = fsdp(path, template, files["sft"], work / f"{name}-fsdp", job, processes, args.timeout)
                if "error" in r:
                    print(r.get("stderr", r["error"]), file=sys.stderr)
                rows.append({"model": name, "stage": "sft-fsdp", "side": f"posttrain x{processes}", "params": params, **r})
    for r in rows:
        r.pop("stderr", None)
    text = table(rows, peak, source)
    print(text)
    print(f"\n{args.device}, {dtype}, {steps} steps per run, torch {torch.__version__}; "
          f"{time.perf_counter() - t0:.0f} s in all")
    Path(args.output).write_text(json.dumps({"device": args.device, "dtype": dtype, "peak_flops": peak,
                                             "peak_source": source, "steps": steps, "rows": rows}, indent=1))
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"{len(failed)} run(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
